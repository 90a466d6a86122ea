//! The broker: identities, policy, the request workflow, PINs, notifications and signed grants
#![forbid(unsafe_code)]
