//! Seeds and their parameters: parsing `otpauth://totp/` URIs and Base32
//! secrets into validated values. A [`Seed`] is zeroized on drop and prints
//! `[redacted]`; parse errors never quote the secret.

use std::fmt;

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, percent_decode_str, utf8_percent_encode};
use secrecy::{ExposeSecret, SecretSlice};
use zeroize::Zeroizing;

/// Shortest seed accepted: 80 bits (GitHub and others issue them).
pub const MIN_SEED_BYTES: usize = 10;
/// Seeds shorter than this (128 bits, RFC 4226 §4) are reported as weak.
pub const STRONG_SEED_BYTES: usize = 16;
/// Longest seed accepted.
pub const MAX_SEED_BYTES: usize = 128;
/// Longest step accepted, in seconds.
pub const MAX_PERIOD: u32 = 300;
/// Longest label or issuer accepted, in bytes after percent-decoding.
pub const MAX_TEXT_BYTES: usize = 256;

/// What [`SeedSpec::to_uri`] percent-encodes in a label or issuer.
const URI_TEXT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~')
    .remove(b'@');

/// Why a seed or its parameters were refused. Never contains the secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SeedError {
    /// The URI is not an otpauth TOTP URI.
    #[error("not an otpauth TOTP URI: {0}")]
    NotOtpauth(&'static str),
    /// The URI or a value in it is not valid UTF-8 or holds control characters.
    #[error("the otpauth URI's {0} is not valid UTF-8 text or holds control characters")]
    BadText(&'static str),
    /// A label or issuer is longer than [`MAX_TEXT_BYTES`].
    #[error("the otpauth URI's {0} is longer than 256 bytes; shorten it")]
    TooLong(&'static str),
    /// A required part is missing.
    #[error("the otpauth URI has no secret parameter")]
    MissingSecret,
    /// The secret is not Base32.
    #[error("the secret is not valid Base32 (RFC 4648: letters A-Z and digits 2-7)")]
    BadBase32,
    /// The secret is too short or too long.
    #[error("the secret is {0} bits; twokey accepts 80 to 1024 bits")]
    BadLength(usize),
    /// Unknown algorithm.
    #[error("unknown algorithm {0:?}; use SHA1, SHA256 or SHA512")]
    BadAlgorithm(String),
    /// Digits out of range.
    #[error("digits must be 6, 7 or 8, not {0}")]
    BadDigits(String),
    /// Period out of range.
    #[error("period must be 1 to 300 seconds, not {0}")]
    BadPeriod(String),
    /// A parameter appears twice.
    #[error("the otpauth URI repeats the {0} parameter")]
    Repeated(String),
}

/// The hash function of a seed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Algorithm {
    /// HMAC-SHA1.
    Sha1,
    /// HMAC-SHA256.
    Sha256,
    /// HMAC-SHA512.
    Sha512,
}

impl Algorithm {
    /// The name an otpauth URI uses.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Sha1 => "SHA1",
            Self::Sha256 => "SHA256",
            Self::Sha512 => "SHA512",
        }
    }

    /// Parses `SHA1`, `SHA256`, `SHA512` (any case).
    pub fn parse(text: &str) -> Result<Self, SeedError> {
        match text.to_ascii_uppercase().as_str() {
            "SHA1" => Ok(Self::Sha1),
            "SHA256" => Ok(Self::Sha256),
            "SHA512" => Ok(Self::Sha512),
            _ => Err(SeedError::BadAlgorithm(text.chars().take(20).collect())),
        }
    }
}

/// How codes are computed from a seed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TotpParams {
    /// Hash function.
    pub algorithm: Algorithm,
    /// Digits per code, 6 to 8.
    pub digits: u8,
    /// Step length in seconds, 1 to 300.
    pub period: u32,
}

impl Default for TotpParams {
    fn default() -> Self {
        Self {
            algorithm: Algorithm::Sha1,
            digits: 6,
            period: 30,
        }
    }
}

impl TotpParams {
    /// Checks digits and period.
    pub fn validated(self) -> Result<Self, SeedError> {
        if !(6..=8).contains(&self.digits) {
            return Err(SeedError::BadDigits(self.digits.to_string()));
        }
        if !(1..=MAX_PERIOD).contains(&self.period) {
            return Err(SeedError::BadPeriod(self.period.to_string()));
        }
        Ok(self)
    }
}

/// Raw seed bytes, held in a `secrecy` box: zeroized on drop, read only
/// through [`Seed::expose`]; Debug prints `[redacted]`.
pub struct Seed(SecretSlice<u8>);

impl Clone for Seed {
    fn clone(&self) -> Self {
        Self(self.expose().to_vec().into())
    }
}

impl PartialEq for Seed {
    fn eq(&self, other: &Self) -> bool {
        self.expose() == other.expose()
    }
}

impl Eq for Seed {}

impl fmt::Debug for Seed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Seed([redacted])")
    }
}

impl Seed {
    /// A seed from raw bytes, checking its length.
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Self, SeedError> {
        let bytes = SecretSlice::from(bytes);
        let len = bytes.expose_secret().len();
        if !(MIN_SEED_BYTES..=MAX_SEED_BYTES).contains(&len) {
            return Err(SeedError::BadLength(len * 8));
        }
        Ok(Self(bytes))
    }

    /// Decodes Base32 (RFC 4648), ignoring case, spaces, dashes and padding.
    pub fn from_base32(text: &str) -> Result<Self, SeedError> {
        let cleaned: Zeroizing<String> = Zeroizing::new(
            text.chars()
                .filter(|c| !matches!(c, ' ' | '-' | '=' | '\n' | '\r' | '\t'))
                .map(|c| c.to_ascii_uppercase())
                .collect(),
        );
        let bytes = data_encoding::BASE32_NOPAD
            .decode(cleaned.as_bytes())
            .map_err(|_| SeedError::BadBase32)?;
        Self::from_bytes(bytes)
    }

    /// The seed bytes.
    pub fn expose(&self) -> &[u8] {
        self.0.expose_secret()
    }

    /// Length in bits.
    pub fn bits(&self) -> usize {
        self.expose().len() * 8
    }

    /// True when shorter than 128 bits.
    pub fn is_weak(&self) -> bool {
        self.expose().len() < STRONG_SEED_BYTES
    }
}

/// A seed with everything enrollment needs.
#[derive(Debug, Clone)]
pub struct SeedSpec {
    /// The secret.
    pub seed: Seed,
    /// How codes are computed.
    pub params: TotpParams,
    /// Issuer, e.g. `Amazon Web Services`.
    pub issuer: String,
    /// Label, usually the user name at the issuer.
    pub label: String,
}

impl SeedSpec {
    /// Prints the spec as an `otpauth://totp/` URI that [`parse_otpauth`]
    /// reads back to the same spec. The URI holds the secret: it is zeroized
    /// on drop, and only tests and the fuzz targets call this; no service
    /// sends or logs it.
    pub fn to_uri(&self) -> Zeroizing<String> {
        let enc = |t: &str| utf8_percent_encode(t, URI_TEXT).to_string();
        // The path is `ISSUER:LABEL` when that reads back unchanged, else the
        // label alone (after a leading ':' when the label itself holds one).
        let path = if !self.issuer.is_empty()
            && !self.issuer.contains(':')
            && self.issuer.trim() == self.issuer
            && self.issuer.len() + 1 + self.label.len() <= MAX_TEXT_BYTES
        {
            format!("{}:{}", enc(&self.issuer), enc(&self.label))
        } else if self.label.contains(':') {
            format!(":{}", enc(&self.label))
        } else {
            enc(&self.label)
        };
        let secret = Zeroizing::new(data_encoding::BASE32_NOPAD.encode(self.seed.expose()));
        let mut uri = Zeroizing::new(format!("otpauth://totp/{path}?secret="));
        uri.push_str(&secret);
        if !self.issuer.is_empty() {
            uri.push_str("&issuer=");
            uri.push_str(&enc(&self.issuer));
        }
        uri.push_str(&format!(
            "&algorithm={}&digits={}&period={}",
            self.params.algorithm.as_str(),
            self.params.digits,
            self.params.period
        ));
        uri
    }
}

fn clean_text(text: &str, what: &'static str) -> Result<String, SeedError> {
    let decoded = percent_decode_str(text)
        .decode_utf8()
        .map_err(|_| SeedError::BadText(what))?;
    if decoded.chars().any(char::is_control) {
        return Err(SeedError::BadText(what));
    }
    if decoded.len() > MAX_TEXT_BYTES {
        return Err(SeedError::TooLong(what));
    }
    Ok(decoded.into_owned())
}

/// Parses `otpauth://totp/[ISSUER:]LABEL?secret=…&issuer=…&algorithm=…&digits=…&period=…`.
pub fn parse_otpauth(uri: &str) -> Result<SeedSpec, SeedError> {
    let uri = uri.trim();
    if uri.chars().any(char::is_control) {
        return Err(SeedError::BadText("text"));
    }
    let rest = uri
        .strip_prefix("otpauth://")
        .ok_or(SeedError::NotOtpauth("it must start with otpauth://"))?;
    let (kind, rest) = rest
        .split_once('/')
        .ok_or(SeedError::NotOtpauth("it has no label"))?;
    if !kind.eq_ignore_ascii_case("totp") {
        return Err(SeedError::NotOtpauth("only totp is supported, not hotp"));
    }
    let (label_part, query) = rest.split_once('?').unwrap_or((rest, ""));
    let label_full = clean_text(label_part, "label")?;
    let (label_issuer, label) = match label_full.split_once(':') {
        Some((i, l)) => (i.trim().to_owned(), l.trim().to_owned()),
        None => (String::new(), label_full.trim().to_owned()),
    };

    let mut secret: Option<Zeroizing<String>> = None;
    let mut issuer = None;
    let mut params = TotpParams::default();
    let mut seen = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let key = key.to_ascii_lowercase();
        if seen.contains(&key) {
            return Err(SeedError::Repeated(key.chars().take(20).collect()));
        }
        seen.push(key.clone());
        match key.as_str() {
            "secret" => {
                secret = Some(Zeroizing::new(
                    percent_decode_str(value)
                        .decode_utf8()
                        .map_err(|_| SeedError::BadText("secret"))?
                        .into_owned(),
                ));
            }
            "issuer" => issuer = Some(clean_text(value, "issuer")?),
            "algorithm" => params.algorithm = Algorithm::parse(&clean_text(value, "algorithm")?)?,
            "digits" => {
                params.digits = value
                    .parse::<u8>()
                    .map_err(|_| SeedError::BadDigits(value.chars().take(20).collect()))?;
            }
            "period" => {
                params.period = value
                    .parse::<u32>()
                    .map_err(|_| SeedError::BadPeriod(value.chars().take(20).collect()))?;
            }
            // Other parameters (image, counter…) carry nothing we need.
            _ => {}
        }
    }
    let secret = secret.ok_or(SeedError::MissingSecret)?;
    Ok(SeedSpec {
        seed: Seed::from_base32(&secret)?,
        params: params.validated()?,
        issuer: issuer.unwrap_or(label_issuer),
        label,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const AWS_SECRET: &str = "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP";

    #[test]
    fn parses_an_aws_style_uri() {
        let uri = format!(
            "otpauth://totp/Amazon%20Web%20Services:root-account-mfa-device@123456789012?secret={AWS_SECRET}&issuer=Amazon%20Web%20Services"
        );
        let spec = parse_otpauth(&uri).unwrap();
        assert_eq!(AWS_SECRET.len(), 64);
        assert_eq!(spec.issuer, "Amazon Web Services");
        assert_eq!(spec.label, "root-account-mfa-device@123456789012");
        assert_eq!(spec.params, TotpParams::default());
        assert_eq!(spec.seed.bits(), 320);
        assert!(!spec.seed.is_weak());
    }

    #[test]
    fn parses_parameters() {
        let spec = parse_otpauth(
            "otpauth://totp/x?secret=GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ&algorithm=sha512&digits=8&period=60",
        )
        .unwrap();
        assert_eq!(
            spec.params,
            TotpParams {
                algorithm: Algorithm::Sha512,
                digits: 8,
                period: 60
            }
        );
    }

    #[test]
    fn an_80_bit_seed_is_accepted_but_weak() {
        let seed = Seed::from_base32("JBSWY3DPEHPK3PXP").unwrap();
        assert_eq!(seed.bits(), 80);
        assert!(seed.is_weak());
    }

    #[test]
    fn malformed_uris_are_refused_with_a_reason() {
        let s = "secret=JBSWY3DPEHPK3PXP";
        let cases: &[(String, SeedError)] = &[
            (
                "otpauth://totp/x?secret=JBSWY3DPEHPK3PX!".into(),
                SeedError::BadBase32,
            ),
            (
                format!("otpauth://totp/x?{s}&digits=0"),
                SeedError::BadDigits("0".into()),
            ),
            (
                format!("otpauth://totp/x?{s}&digits=10"),
                SeedError::BadDigits("10".into()),
            ),
            (
                format!("otpauth://totp/x?{s}&period=0"),
                SeedError::BadPeriod("0".into()),
            ),
            (
                format!("otpauth://totp/x?{s}&period=1000000000"),
                SeedError::BadPeriod("1000000000".into()),
            ),
            (
                format!("otpauth://totp/x?{s}&algorithm=MD5"),
                SeedError::BadAlgorithm("MD5".into()),
            ),
            (
                format!("otpauth://totp/%FF%FE?{s}"),
                SeedError::BadText("label"),
            ),
            (
                format!("otpauth://totp/x?{s}&issuer=a%00b"),
                SeedError::BadText("issuer"),
            ),
            ("otpauth://totp/x?issuer=a".into(), SeedError::MissingSecret),
            (
                format!("otpauth://totp/{}?{s}", "l".repeat(257)),
                SeedError::TooLong("label"),
            ),
            (
                format!("otpauth://totp/x?{s}&issuer={}", "%41".repeat(257)),
                SeedError::TooLong("issuer"),
            ),
            (
                format!("otpauth://hotp/x?{s}"),
                SeedError::NotOtpauth("only totp is supported, not hotp"),
            ),
            (
                "https://example.org".into(),
                SeedError::NotOtpauth("it must start with otpauth://"),
            ),
            (
                "otpauth://totp/x?secret=GEZDGNBV".into(),
                SeedError::BadLength(40),
            ),
        ];
        for (uri, want) in cases {
            assert_eq!(parse_otpauth(uri).unwrap_err(), *want, "{uri}");
        }
    }

    #[test]
    fn errors_and_debug_never_show_the_secret() {
        let err = parse_otpauth("otpauth://totp/x?secret=JBSWY3DPEHPK3PX1").unwrap_err();
        assert!(!err.to_string().contains("JBSWY3DPEHPK3PX1"));
        let spec = parse_otpauth("otpauth://totp/x?secret=JBSWY3DPEHPK3PXP").unwrap();
        let dbg = format!("{spec:?}");
        assert!(!dbg.contains("JBSWY3DPEHPK3PXP") && dbg.contains("[redacted]"));
    }

    #[test]
    fn to_uri_prints_an_aws_style_uri() {
        let spec = SeedSpec {
            seed: Seed::from_base32("JBSWY3DPEHPK3PXP").unwrap(),
            params: TotpParams::default(),
            issuer: "Amazon Web Services".into(),
            label: "root@123456789012".into(),
        };
        assert_eq!(
            *spec.to_uri(),
            "otpauth://totp/Amazon%20Web%20Services:root@123456789012?secret=JBSWY3DPEHPK3PXP\
             &issuer=Amazon%20Web%20Services&algorithm=SHA1&digits=6&period=30"
        );
    }

    fn same(a: &SeedSpec, b: &SeedSpec) -> bool {
        a.seed == b.seed && a.params == b.params && a.issuer == b.issuer && a.label == b.label
    }

    proptest::proptest! {
        #[test]
        fn any_input_parses_or_errors_without_panicking(s in "\\PC*") {
            let _ = parse_otpauth(&s);
            let _ = Seed::from_base32(&s);
        }

        #[test]
        fn printed_specs_parse_back_to_themselves(
            seed in proptest::collection::vec(proptest::num::u8::ANY, MIN_SEED_BYTES..=MAX_SEED_BYTES),
            algorithm in proptest::sample::select(vec![Algorithm::Sha1, Algorithm::Sha256, Algorithm::Sha512]),
            digits in 6u8..=8,
            period in 1u32..=MAX_PERIOD,
            issuer in "[^\\p{Cc}]{0,40}",
            label in "[^\\p{Cc}]{0,40}",
        ) {
            let spec = SeedSpec {
                seed: Seed::from_bytes(seed).unwrap(),
                params: TotpParams { algorithm, digits, period },
                issuer,
                label: label.trim().to_owned(),
            };
            let back = parse_otpauth(&spec.to_uri()).unwrap();
            proptest::prop_assert!(same(&spec, &back), "{spec:?} came back as {back:?}");
        }

        #[test]
        fn parsed_uris_print_and_parse_back_to_the_same_spec(s in "otpauth://totp/[^\\p{Cc}?]{0,30}\\?secret=[A-Z2-7]{16,40}(&[a-z]{1,9}=[^\\p{Cc}&]{0,12}){0,4}") {
            if let Ok(spec) = parse_otpauth(&s) {
                let back = parse_otpauth(&spec.to_uri()).unwrap();
                proptest::prop_assert!(same(&spec, &back), "{s:?}: {spec:?} came back as {back:?}");
            }
        }
    }
}
