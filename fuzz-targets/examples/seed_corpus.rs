//! Writes the seed inputs each fuzz target starts from into
//! `fuzz/corpus/<target>/` (`cargo run -p twokey-fuzz-targets --example
//! seed_corpus`); the fuzzer grows and `cargo fuzz cmin` minimises them.

use std::{path::Path, time::Duration};

use prost::Message;
use twokey_audit::checkpoint::{Checkpoint, CheckpointSigner};
use twokey_fuzz_targets::{key, now};
use twokey_proto::{
    audit::v1::Event,
    vault::v1::{Grant, GrantPurpose},
};
use twokey_runtime::{events::sign_event, grant::sign_grant, time::to_timestamp};

fn write(target: &str, name: &str, data: &[u8]) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    std::fs::create_dir_all(&dir).expect("can create the corpus directory");
    std::fs::write(dir.join(format!("seed-{name}")), data).expect("can write a seed");
}

fn main() {
    for (name, uri) in [
        (
            "aws",
            "otpauth://totp/Amazon%20Web%20Services:root@123456789012?secret=JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP&issuer=Amazon%20Web%20Services",
        ),
        (
            "params",
            "otpauth://totp/x?secret=GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ&algorithm=sha512&digits=8&period=60",
        ),
        (
            "digits0",
            "otpauth://totp/x?secret=JBSWY3DPEHPK3PXP&digits=0",
        ),
        (
            "period-big",
            "otpauth://totp/x?secret=JBSWY3DPEHPK3PXP&period=1000000000",
        ),
        ("control", "otpauth://totp/a%00b?secret=JBSWY3DPEHPK3PXP"),
        ("base32", "JBSWY3DP-EHPK 3PXP===="),
    ] {
        write("otpauth", name, uri.as_bytes());
    }

    let grant = Grant {
        grant_id: "g-1".into(),
        purpose: GrantPurpose::Release as i32,
        request_id: "r-1".into(),
        account_id: "aws-prod-root".into(),
        requester: "spiffe://twokey.local/user/alice".into(),
        approvers: vec!["spiffe://twokey.local/user/bob".into()],
        operator: "spiffe://twokey.local/user/olivia".into(),
        issued_at: Some(to_timestamp(now() - Duration::from_secs(10))),
        expires_at: Some(to_timestamp(now() + Duration::from_secs(50))),
    };
    // Odd first byte: the target signs; 1 asks for RELEASE_CODE.
    write(
        "grant",
        "unsigned",
        &[[1].as_slice(), &grant.encode_to_vec()].concat(),
    );
    let signed = sign_grant(&key(), &grant);
    write(
        "grant",
        "signed",
        &[[0].as_slice(), &signed.encode_to_vec()].concat(),
    );

    let event = Event {
        source: "spiffe://twokey.local/svc/broker".into(),
        seq: 1,
        time: Some(to_timestamp(now())),
        actor: "spiffe://twokey.local/user/alice".into(),
        action: "request.created".into(),
        account_id: "aws-prod-root".into(),
        request_id: "r-1".into(),
        outcome: 1,
        trace_id: "4bf92f3577b34da6a3ce929d0e0e4736".into(),
        span_id: "00f067aa0ba902b7".into(),
        attributes: [("reason".to_owned(), "rotate keys".to_owned())].into(),
    };
    write(
        "event",
        "unsigned",
        &[[1].as_slice(), &event.encode_to_vec()].concat(),
    );
    let signed = sign_event(&key(), &event);
    write(
        "event",
        "signed",
        &[[0].as_slice(), &signed.encode_to_vec()].concat(),
    );

    let policy =
        std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/policy.example.toml"))
            .expect("deploy/policy.example.toml is readable");
    write("policy", "example", &policy);

    let signer = CheckpointSigner::new("twokey.local/audit", key()).expect("valid name");
    let checkpoint = Checkpoint {
        origin: "twokey.local/audit".into(),
        size: 42,
        root: [3; 32],
    };
    write("checkpoint", "body", checkpoint.body().as_bytes());
    write(
        "checkpoint",
        "note",
        signer.sign(&checkpoint).expect("signs").as_bytes(),
    );
    write(
        "checkpoint",
        "verifier",
        signer.verifier().to_string().as_bytes(),
    );
}
