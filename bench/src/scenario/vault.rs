//! Vault `GenerateCode` with grants and the people's signed consent (alice's
//! request, bob's approval, olivia's release, each an `sshsig` signature the
//! vault verifies against the signed policy) made before the clock starts
//! (each code waits for audit's durable acknowledgement of its
//! `code.released` event), beside vault `Status`, the empty mTLS round trip,
//! at the same concurrency; and `Enroll`, used to fill the vault for the
//! footprint run and to enroll the accounts the releases are spread over.
//!
//! The vault hands out each TOTP step of an account once and at most 2
//! steps ahead of the current one (issue 16), so an account yields at most
//! 3 codes per 30 s step window — and enrollment itself hands out the
//! current and the next step as registration codes, so an account enrolled
//! in the current window has only one step left in it. Every release
//! therefore gets an account of its own ([`CODES_PER_ACCOUNT`]), enrolled
//! before the clock starts, so no release depends on when a step window
//! turns over.

use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use anyhow::{Result, bail, ensure};
use ed25519_dalek::SigningKey;
use tonic::transport::Channel;
use twokey_consent::{
    Binding, SignedStatement, approval_binding, new_id, new_statement, release_binding,
    request_binding, sign_statement,
};
use twokey_proto::vault::v1::{
    EnrollRequest, GenerateCodeRequest, GrantPurpose, ReleaseEvidence, SignedGrant, StatusRequest,
    enroll_request, vault_service_client::VaultServiceClient,
};
use twokey_testkit::consent::Person;

use crate::{
    setup::{BenchPeople, TD},
    stats::{Phase, Row, drive},
};

/// The row of `Status` on the bare tonic mTLS server.
pub const BARE_STATUS: &str = "Status on a bare tonic mTLS server (transport baseline)";

/// Releases the bench asks of one freshly enrolled account: the one step an
/// account enrolled in the current step window is sure to have left (its
/// registration codes took the current and the next step).
pub const CODES_PER_ACCOUNT: usize = 1;

/// How many freshly enrolled accounts `codes` releases need.
pub fn accounts_for(codes: usize) -> usize {
    codes.div_ceil(CODES_PER_ACCOUNT)
}

/// `count` account ids `{prefix}-NNNNNN`.
pub fn account_names(prefix: &str, count: usize) -> Vec<String> {
    (0..count).map(|i| format!("{prefix}-{i:06}")).collect()
}

/// A release grant for `account`, as the broker signs one.
pub fn grant(key: &SigningKey, account: &str, n: usize) -> SignedGrant {
    let grant = twokey_testkit::grants::release(
        TD,
        &format!("bench-{}-{n}", rand::random::<u64>()),
        &format!("bench-req-{n}"),
        account,
        SystemTime::now(),
    );
    twokey_runtime::grant::sign_grant(key, &grant)
}

/// `person`'s statement under policy version 1, signed now.
fn statement(person: &Person, binding: Binding) -> Result<SignedStatement> {
    let statement = new_statement(1, person.id(), SystemTime::now(), binding);
    sign_statement(&person.key, TD, &statement).map_err(anyhow::Error::msg)
}

/// One release of `account` as the vault sees it after a real flow: a
/// grant signed with the broker's `key` and the people's consent to it
/// (alice's request, bob's approval, olivia's release binding the grant).
pub fn release(
    key: &SigningKey,
    people: &BenchPeople,
    account: &str,
) -> Result<GenerateCodeRequest> {
    let (request_id, grant_id) = (new_id(), new_id());
    let alice = &people.alice;
    let request = statement(
        alice,
        request_binding(
            &request_id,
            account,
            alice.id(),
            "benchmark",
            "",
            SystemTime::now(),
        ),
    )?;
    let approvals = vec![statement(
        &people.bob,
        approval_binding(&request).map_err(anyhow::Error::msg)?,
    )?];
    let binding =
        release_binding(&request, &approvals, &grant_id, &new_id()).map_err(anyhow::Error::msg)?;
    let release = statement(&people.olivia, binding)?;
    let grant =
        twokey_testkit::grants::release(TD, &grant_id, &request_id, account, SystemTime::now());
    Ok(GenerateCodeRequest {
        grant: Some(twokey_runtime::grant::sign_grant(key, &grant)),
        evidence: Some(ReleaseEvidence {
            request: Some(request),
            approvals,
            release: Some(release),
        }),
    })
}

/// Enrolls `account` with a random 160-bit seed, for an enrollment grant
/// signed with the broker's `grant_key` (as the broker signs one for admin
/// adam).
pub async fn enroll(
    client: &mut VaultServiceClient<Channel>,
    grant_key: &SigningKey,
    account: &str,
) -> Result<()> {
    let seed: [u8; 20] = rand::random();
    let secret = base32(&seed);
    let grant = twokey_proto::vault::v1::Grant {
        operator: format!("spiffe://{TD}/user/adam"),
        ..twokey_testkit::grants::grant(
            &format!("bench-enroll-{}", rand::random::<u64>()),
            account,
            GrantPurpose::Enroll,
            SystemTime::now(),
        )
    };
    let r = client
        .enroll(EnrollRequest {
            account_id: account.into(),
            seed: Some(enroll_request::Seed::Base32Secret(secret)),
            grant: Some(twokey_runtime::grant::sign_grant(grant_key, &grant)),
            ..Default::default()
        })
        .await?
        .into_inner();
    ensure!(r.current.is_some_and(|c| c.code.len() == 6), "no code");
    Ok(())
}

fn base32(bytes: &[u8]) -> String {
    const A: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut out = String::new();
    let (mut buf, mut bits) = (0u32, 0u32);
    for &b in bytes {
        buf = (buf << 8) | u32::from(b);
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(A[((buf >> bits) & 31) as usize] as char);
        }
    }
    if bits > 0 {
        out.push(A[((buf << (5 - bits)) & 31) as usize] as char);
    }
    out
}

/// Enrolls `count` accounts `bench-NNNNNN` at `concurrency`.
pub async fn enroll_many(
    client: &VaultServiceClient<Channel>,
    grant_key: &SigningKey,
    count: usize,
    concurrency: usize,
    limit: Duration,
) -> Row {
    let client = client.clone();
    let grant_key = grant_key.clone();
    drive(count, concurrency, limit, move |i| {
        let mut c = client.clone();
        let grant_key = grant_key.clone();
        async move { enroll(&mut c, &grant_key, &format!("bench-{i:07}")).await }
    })
    .await
    .row("vault", "Enroll (fills the vault)", false, concurrency)
}

/// Enrolls every one of `accounts` at `concurrency` (setup, not a
/// measurement); fails unless all were enrolled.
pub async fn enroll_all(
    client: &VaultServiceClient<Channel>,
    grant_key: &SigningKey,
    accounts: &[String],
    concurrency: usize,
    limit: Duration,
) -> Result<()> {
    let (client, grant_key) = (client.clone(), grant_key.clone());
    let names: Arc<Vec<String>> = Arc::new(accounts.to_vec());
    let driven = drive(names.len(), concurrency, limit, move |i| {
        let (mut c, grant_key, names) = (client.clone(), grant_key.clone(), names.clone());
        async move { enroll(&mut c, &grant_key, &names[i]).await }
    })
    .await;
    if driven.errors > 0 {
        bail!(
            "enrolling {} accounts: {} failed, first: {}",
            accounts.len(),
            driven.errors,
            driven.first_error.unwrap_or_default()
        );
    }
    Ok(())
}

/// `Status` on the bare tonic server ([`crate::bare`]), `Status` on the
/// vault, then `GenerateCode`, `count` each at `concurrency`, the codes
/// spread round-robin over `accounts` (enrolled, named by the signed
/// policy, at least [`accounts_for`]`(count)` of them).
#[allow(clippy::too_many_arguments)]
pub async fn run(
    client: &VaultServiceClient<Channel>,
    bare: &VaultServiceClient<Channel>,
    grant_key: &SigningKey,
    people: &BenchPeople,
    accounts: &[String],
    count: usize,
    status_calls: usize,
    concurrency: usize,
    limit: Duration,
) -> Result<Vec<Row>> {
    ensure!(
        accounts.len() >= accounts_for(count),
        "{count} codes need {} accounts, got {}",
        accounts_for(count),
        accounts.len()
    );
    // Warm up connections and code paths.
    for _ in 0..32 {
        client.clone().status(StatusRequest {}).await?;
        bare.clone().status(StatusRequest {}).await?;
    }
    let status_of = |c: &VaultServiceClient<Channel>| {
        let c = c.clone();
        drive(status_calls, concurrency, limit, move |_| {
            let mut c = c.clone();
            async move {
                c.status(StatusRequest {}).await?;
                Ok(())
            }
        })
    };
    let phase = Phase::start("vault: bare Status");
    let floor = status_of(bare)
        .await
        .row("vault", BARE_STATUS, true, concurrency);
    drop(phase);
    let phase = Phase::start("vault: Status");
    let mut status =
        status_of(client)
            .await
            .row("vault", "Status (empty mTLS round trip)", true, concurrency);
    drop(phase);
    status.target = "≥ 60% of the bare server".into();

    // Grants and statements are made before the clock starts; grants live
    // 120 s, a release statement is good for 2 minutes.
    let grants: Arc<Vec<GenerateCodeRequest>> = Arc::new(
        (0..count)
            .map(|n| release(grant_key, people, &accounts[n % accounts.len()]))
            .collect::<Result<_>>()?,
    );
    let c = client.clone();
    let limit = limit.min(Duration::from_secs(100));
    let phase = Phase::start("vault: GenerateCode");
    let mut codes = drive(count, concurrency, limit, move |i| {
        let mut c = c.clone();
        let request = grants[i].clone();
        async move {
            let r = c.generate_code(request).await?.into_inner();
            ensure!(r.code.is_some_and(|c| !c.code.is_empty()), "empty code");
            Ok(())
        }
    })
    .await
    .row(
        "vault",
        "GenerateCode (signed grant, audit ack)",
        false,
        concurrency,
    );
    drop(phase);
    codes.target = "≥ 40% of Status".into();
    Ok(vec![floor, status, codes])
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_release_has_an_account_of_its_own() {
        assert_eq!(super::accounts_for(64), 64 / super::CODES_PER_ACCOUNT);
        assert_eq!(super::accounts_for(0), 0);
        let names = super::account_names("bench-code", 3);
        assert_eq!(
            names,
            [
                "bench-code-000000",
                "bench-code-000001",
                "bench-code-000002"
            ]
        );
    }

    #[test]
    fn base32_matches_rfc4648() {
        assert_eq!(super::base32(b"foobar"), "MZXW6YTBOI");
        assert_eq!(super::base32(b"f"), "MY");
    }
}
