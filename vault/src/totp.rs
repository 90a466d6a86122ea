//! TOTP (RFC 6238) codes from a seed, with the step and validity window that
//! a bare code lacks. Uses totp-rs for the HMAC truncation.

use std::fmt;

use zeroize::Zeroizing;

use crate::seed::{Algorithm, Seed, TotpParams};

/// A code and its window. Debug prints `[redacted]` for the code.
#[derive(Clone, PartialEq, Eq)]
pub struct CodeValue {
    /// The zero-padded code. Secret.
    pub code: Zeroizing<String>,
    /// T = floor(unix time / period).
    pub step: u64,
    /// Step length in seconds.
    pub period: u32,
    /// Unix time the step starts.
    pub valid_from: u64,
    /// Unix time the step ends (exclusive).
    pub valid_until: u64,
}

impl fmt::Debug for CodeValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CodeValue")
            .field("code", &"[redacted]")
            .field("step", &self.step)
            .field("period", &self.period)
            .field("valid_from", &self.valid_from)
            .field("valid_until", &self.valid_until)
            .finish()
    }
}

/// The code of time step `step`. `params` must be validated.
pub fn code_for_step(seed: &Seed, params: TotpParams, step: u64) -> CodeValue {
    let algorithm = match params.algorithm {
        Algorithm::Sha1 => totp_rs::Algorithm::SHA1,
        Algorithm::Sha256 => totp_rs::Algorithm::SHA256,
        Algorithm::Sha512 => totp_rs::Algorithm::SHA512,
    };
    let period = u64::from(params.period.max(1));
    // Lengths and parameters are checked by `Seed` and `TotpParams`; the
    // non-compliant builder only skips totp-rs's 128-bit minimum, since
    // 80-bit seeds are real (and reported as weak).
    let totp = totp_rs::Builder::new()
        .with_algorithm(algorithm)
        .with_digits(params.digits.clamp(6, 8))
        .with_step_duration(period)
        .with_secret(seed.expose().to_vec())
        .build_noncompliant();
    let start = step.saturating_mul(period);
    CodeValue {
        code: Zeroizing::new(totp.generate(start).to_string()),
        step,
        period: params.period,
        valid_from: start,
        valid_until: start.saturating_add(period),
    }
}

/// The code at Unix time `unix`.
pub fn code_at(seed: &Seed, params: TotpParams, unix: u64) -> CodeValue {
    code_for_step(seed, params, unix / u64::from(params.period.max(1)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 6238 Appendix B: times and the 8-digit codes for each algorithm.
    const VECTORS: &[(u64, &str, &str, &str)] = &[
        (59, "94287082", "46119246", "90693936"),
        (1111111109, "07081804", "68084774", "25091201"),
        (1111111111, "14050471", "67062674", "99943326"),
        (1234567890, "89005924", "91819424", "93441116"),
        (2000000000, "69279037", "90698825", "38618901"),
        (20000000000, "65353130", "77737706", "47863826"),
    ];

    fn params(algorithm: Algorithm) -> TotpParams {
        TotpParams {
            algorithm,
            digits: 8,
            period: 30,
        }
    }

    #[test]
    fn rfc6238_appendix_b_vectors() {
        let sha1 = Seed::from_bytes(b"12345678901234567890".to_vec()).unwrap();
        let sha256 = Seed::from_bytes(b"12345678901234567890123456789012".to_vec()).unwrap();
        let sha512 = Seed::from_bytes(
            b"1234567890123456789012345678901234567890123456789012345678901234".to_vec(),
        )
        .unwrap();
        for (time, c1, c256, c512) in VECTORS {
            assert_eq!(
                code_at(&sha1, params(Algorithm::Sha1), *time).code.as_str(),
                *c1
            );
            assert_eq!(
                code_at(&sha256, params(Algorithm::Sha256), *time)
                    .code
                    .as_str(),
                *c256
            );
            assert_eq!(
                code_at(&sha512, params(Algorithm::Sha512), *time)
                    .code
                    .as_str(),
                *c512
            );
        }
    }

    #[test]
    fn a_code_carries_its_window() {
        let seed = Seed::from_bytes(b"12345678901234567890".to_vec()).unwrap();
        let code = code_at(&seed, TotpParams::default(), 1111111111);
        assert_eq!(code.step, 37037037);
        assert_eq!(code.valid_from, 1111111110);
        assert_eq!(code.valid_until, 1111111140);
        assert_eq!(code.code.len(), 6);
        assert!(!format!("{code:?}").contains(code.code.as_str()));
    }
}
