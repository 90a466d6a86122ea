//! The pure core of reconciling what AWS saw with what twokey released
//! (issue 20): a root sign-in that no released code explains means a seed
//! copied elsewhere, a second MFA device or a forgotten enrolment.
//!
//! - [`cloudtrail`]: CloudTrail records as AWS delivers them — gzip log files
//!   in the S3 `AWSLogs/<account>/CloudTrail/<region>/YYYY/MM/DD/` layout,
//!   streamed record by record, and single EventBridge events — read into
//!   typed [`cloudtrail::SignIn`] and [`cloudtrail::MfaDeviceChange`]
//!   records; files already read are remembered in a caller-kept
//!   [`cloudtrail::Seen`]; malformed files and records are reported with
//!   their path and reason and skipped, never fatal;
//! - [`matching`]: root sign-ins and MFA device changes of mapped accounts
//!   against the `code.released` times from the audit log, as findings
//!   (matched, unexplained, unprotected, failed, out-of-band, unused) with
//!   exactly defined windows;
//! - [`fixture`]: CloudTrail records in AWS's documented format, log files and
//!   EventBridge events built by code, for tests and the demo.
//!
//! No networking, no gRPC, no storage: the audit source that turns findings
//! into signed events, the notifications, metrics, the EventBridge endpoint
//! and `twokey audit reconcile` are wired elsewhere.
#![forbid(unsafe_code)]

pub mod cloudtrail;
pub mod fixture;
pub mod matching;
