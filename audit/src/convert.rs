//! Wire ↔ domain for the audit service: requests become validated domain
//! values (`TryFrom`), domain answers become responses, and the refusal
//! that ends an append stream becomes a status.

use tonic::{Code, Status};
use twokey_proto::audit::v1::{
    AppendResponse, AppendStatus, GetCheckpointResponse, GetConsistencyProofResponse,
    GetInclusionProofResponse, QueryRequest,
};

use crate::{
    append::{Acked, Refusal},
    error::AuditError,
    merkle::Hash,
    service::{Ack, Query, QueryFilter, SignedCheckpoint, ts},
};

impl From<Ack> for AppendResponse {
    fn from(ack: Ack) -> Self {
        match ack {
            Ack::Stored { seq, index } => Self {
                seq,
                status: AppendStatus::Stored as i32,
                leaf_index: index,
                expected_seq: seq + 1,
                ..Default::default()
            },
            Ack::Duplicate {
                seq,
                index,
                expected,
            } => Self {
                seq,
                status: AppendStatus::Duplicate as i32,
                leaf_index: index,
                expected_seq: expected,
                ..Default::default()
            },
            Ack::Gap { seq, expected } => Self {
                seq,
                status: AppendStatus::Gap as i32,
                leaf_index: 0,
                expected_seq: expected,
                ..Default::default()
            },
        }
    }
}

impl From<Acked> for AppendResponse {
    fn from(acked: Acked) -> Self {
        let mut response = acked.ack.map(Self::from).unwrap_or_default();
        if let Some(from) = acked.restore_from {
            response.status = AppendStatus::Restore as i32;
            response.leaf_index = from;
        }
        if let Some(receipt) = acked.receipt {
            response.checkpoint = receipt.checkpoint.note;
            response.consistency_proof = receipt.proof.iter().map(|h| h.to_vec()).collect();
        }
        response
    }
}

impl From<Refusal<Status>> for Status {
    fn from(refusal: Refusal<Status>) -> Self {
        match refusal {
            Refusal::Log { error, after_seq } => {
                let status = Status::from(error);
                match (status.code(), after_seq) {
                    // Name the place in the stream when the event itself could not say.
                    (Code::InvalidArgument, Some(n)) if !status.message().contains(" seq ") => {
                        Status::invalid_argument(format!(
                            "{} (the event after seq {n} on this stream)",
                            status.message()
                        ))
                    }
                    _ => status,
                }
            }
            Refusal::Stream(status) => status,
            Refusal::ShuttingDown => {
                Status::unavailable("the audit service is shutting down; reconnect and resend")
            }
        }
    }
}

impl TryFrom<&QueryRequest> for Query {
    type Error = AuditError;

    fn try_from(req: &QueryRequest) -> Result<Self, AuditError> {
        let start = if req.page_token.is_empty() {
            None
        } else {
            Some(req.page_token.parse::<u64>().map_err(|_| {
                AuditError::InvalidArgument(format!(
                    "page_token {:?} is not a token from a previous answer",
                    req.page_token.chars().take(40).collect::<String>()
                ))
            })?)
        };
        let filter = QueryFilter {
            since: req.since.as_ref().map(ts),
            until: req.until.as_ref().map(ts),
            source: req.source.clone(),
            actor: req.actor.clone(),
            action: req.action.clone(),
            account_id: req.account_id.clone(),
            request_id: req.request_id.clone(),
            outcome: req.outcome,
            newest_first: req.newest_first,
        };
        if let (Some(since), Some(until)) = (filter.since, filter.until)
            && since > until
        {
            return Err(AuditError::InvalidArgument(
                "since is after until: swap them".into(),
            ));
        }
        let page_size = match req.page_size {
            0 => None,
            n => Some(n as usize),
        };
        Ok(Self {
            filter,
            start,
            page_size,
        })
    }
}

impl From<SignedCheckpoint> for GetCheckpointResponse {
    fn from(cp: SignedCheckpoint) -> Self {
        Self {
            checkpoint: cp.note,
            tree_size: cp.size,
            root_hash: cp.root.to_vec(),
        }
    }
}

fn hash_bytes(hashes: &[Hash]) -> Vec<Vec<u8>> {
    hashes.iter().map(|h| h.to_vec()).collect()
}

/// The answer to an inclusion proof request for `leaf_index`.
pub fn inclusion_response(
    leaf_index: u64,
    (tree_size, hashes): (u64, Vec<Hash>),
) -> GetInclusionProofResponse {
    GetInclusionProofResponse {
        leaf_index,
        tree_size,
        hashes: hash_bytes(&hashes),
    }
}

/// The answer to a consistency proof request from `first_size`.
pub fn consistency_response(
    first_size: u64,
    (second_size, hashes): (u64, Vec<Hash>),
) -> GetConsistencyProofResponse {
    GetConsistencyProofResponse {
        first_size,
        second_size,
        hashes: hash_bytes(&hashes),
    }
}
