//! Message size limits as gRPC says to report them: a message over
//! [`MAX_MESSAGE_BYTES`](crate::serve::MAX_MESSAGE_BYTES) is answered
//! RESOURCE_EXHAUSTED with a message naming the limit. (tonic's decoder
//! refuses it with OUT_OF_RANGE; [`rewrite_over_limit`] and [`limit_status`] rewrite
//! exactly that refusal and nothing else.)

use tonic::{Code, Status};

use crate::serve::MAX_MESSAGE_BYTES;

/// The start of tonic's message when a received message is over the limit.
const TONIC_TOO_LARGE: &str = "Error, decoded message length too large";

/// `status` as RESOURCE_EXHAUSTED if it is tonic's refusal of a received
/// message over the size limit; otherwise `status` unchanged.
pub fn limit_status(status: Status) -> Status {
    if status.code() == Code::OutOfRange && status.message().starts_with(TONIC_TOO_LARGE) {
        let found = status
            .message()
            .split("found ")
            .nth(1)
            .and_then(|r| r.split(' ').next())
            .unwrap_or("more");
        Status::resource_exhausted(format!(
            "the message is {found} bytes, over the limit of {MAX_MESSAGE_BYTES} bytes \
             ({} KiB); send a smaller one",
            MAX_MESSAGE_BYTES / 1024
        ))
    } else {
        status
    }
}

/// Rewrites a unary call's over-limit refusal (a trailers-only response)
/// with [`limit_status`]; every other response is left as it is. The server
/// layer (`trace::TraceLayer`) applies it to every answer.
pub fn rewrite_over_limit<R>(response: &mut http::Response<R>) {
    if let Some(status) = Status::from_header_map(response.headers())
        && status.code() == Code::OutOfRange
    {
        let rewritten = limit_status(status);
        if rewritten.code() == Code::ResourceExhausted {
            let headers = response.headers_mut();
            headers.remove("grpc-status");
            headers.remove("grpc-message");
            headers.remove("grpc-status-details-bin");
            let _ = rewritten.add_header(headers);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_decoders_size_refusal_becomes_resource_exhausted() {
        let tonic = Status::out_of_range(
            "Error, decoded message length too large: found 300000 bytes, the limit is: 262144 bytes",
        );
        let status = limit_status(tonic);
        assert_eq!(status.code(), Code::ResourceExhausted);
        assert!(status.message().contains("300000 bytes"), "{status:?}");
        assert!(status.message().contains("262144 bytes"), "{status:?}");

        let other = limit_status(Status::out_of_range("page token out of range"));
        assert_eq!(other.code(), Code::OutOfRange);
        assert_eq!(other.message(), "page token out of range");
    }
}
