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

/// Seconds a released code must have left in its step when an account
/// names no minimum (a third of the period if that is shorter).
pub const DEFAULT_MIN_SECONDS_LEFT: u32 = 10;
/// How many steps past the current one a release may reach.
pub const MAX_STEPS_AHEAD: u64 = 2;

/// The minimum seconds left an account asks for, `configured` (0 for the
/// default), bounded to below `period`.
pub fn min_seconds_left(configured: u32, period: u32) -> u32 {
    let period = period.max(1);
    match configured {
        0 => DEFAULT_MIN_SECONDS_LEFT.min(period / 3),
        m => m.min(period - 1),
    }
}

/// The step whose code a release at Unix time `now` hands out: the current
/// step, or the next when fewer than `min_left` seconds remain in it, and
/// always above `last`, the highest step handed out before. `Err` holds the
/// seconds to wait when that step is more than [`MAX_STEPS_AHEAD`] steps
/// past the current one.
pub fn choose_step(now: u64, period: u32, min_left: u32, last: Option<u64>) -> Result<u64, u64> {
    let period = u64::from(period.max(1));
    let current = now / period;
    let left = (current + 1) * period - now;
    let mut step = if left < u64::from(min_left) {
        current + 1
    } else {
        current
    };
    if let Some(last) = last {
        step = step.max(last.saturating_add(1));
    }
    if step > current + MAX_STEPS_AHEAD {
        return Err((step - MAX_STEPS_AHEAD).saturating_mul(period) - now);
    }
    Ok(step)
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
    fn the_minimum_defaults_to_ten_seconds_and_stays_below_the_period() {
        assert_eq!(min_seconds_left(0, 30), 10);
        assert_eq!(min_seconds_left(0, 60), 10);
        assert_eq!(min_seconds_left(0, 15), 5);
        assert_eq!(min_seconds_left(20, 30), 20);
        assert_eq!(min_seconds_left(45, 30), 29);
        assert_eq!(min_seconds_left(0, 1), 0);
    }

    #[test]
    fn the_step_is_unused_has_time_left_and_is_never_far_ahead() {
        // 20 s left of step 100: the current step.
        assert_eq!(choose_step(3010, 30, 10, None), Ok(100));
        // 10 s left is enough; 9 s is not.
        assert_eq!(choose_step(3020, 30, 10, None), Ok(100));
        assert_eq!(choose_step(3021, 30, 10, None), Ok(101));
        // A used step is skipped, also when it is ahead.
        assert_eq!(choose_step(3010, 30, 10, Some(100)), Ok(101));
        assert_eq!(choose_step(3010, 30, 10, Some(101)), Ok(102));
        assert_eq!(choose_step(3010, 30, 10, Some(99)), Ok(100));
        // Three steps ahead is refused, with the wait until it is two ahead.
        assert_eq!(choose_step(3010, 30, 10, Some(102)), Err(20));
        assert_eq!(choose_step(3021, 30, 10, Some(102)), Err(9));
        // After waiting, it is handed out.
        assert_eq!(choose_step(3030, 30, 10, Some(102)), Ok(103));
        // A clock that stepped back never reopens a step.
        assert_eq!(choose_step(3010, 30, 10, Some(200)), Err(98 * 30 + 20));
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
