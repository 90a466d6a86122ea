//! Criterion micro-benchmarks of the operations on twokey's release path:
//! TOTP, grant sign/verify, event sign/verify (single and batch), Merkle
//! append and proofs, and opening a sealed seed.
#![forbid(unsafe_code)]

use std::{hint::black_box, time::SystemTime};

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use ed25519_dalek::{Signature, SigningKey};
use prost::Message;
use twokey_audit::{
    merkle::{self, Hash, leaf_hash, node_hash},
    store::{LogStore, SledStore},
};
use twokey_bench::{scenario::audit::event, setup::svc_id};
use twokey_proto::{
    audit::v1::{Event, LogEntry},
    vault::v1::GrantPurpose,
};
use twokey_runtime::{
    events::{EventSigner, verify_event},
    grant::GrantVerifier,
    keys::SecretKey,
};
use twokey_vault::{
    crypto::MasterKey,
    seed::{Seed, TotpParams},
    totp::code_at,
};

fn signer() -> EventSigner {
    EventSigner::new(svc_id("vault"), SigningKey::from_bytes(&[7; 32]))
}

fn totp(c: &mut Criterion) {
    let seed = Seed::from_bytes(b"12345678901234567890".to_vec()).unwrap();
    c.bench_function("totp/sha1_6_digits", |b| {
        b.iter(|| {
            code_at(
                black_box(&seed),
                TotpParams::default(),
                black_box(1_700_000_000),
            )
        })
    });
}

fn grants(c: &mut Criterion) {
    let key = SigningKey::from_bytes(&[9; 32]);
    c.bench_function("grant/encode_and_sign", |b| {
        b.iter(|| twokey_bench::scenario::vault::grant(black_box(&key), "bench-root", 1))
    });
    let verifier = GrantVerifier::new(key.verifying_key());
    let signed = twokey_bench::scenario::vault::grant(&key, "bench-root", 1);
    c.bench_function("grant/verify_strict_and_decode", |b| {
        b.iter(|| {
            verifier
                .verify(
                    Some(black_box(&signed)),
                    GrantPurpose::Release,
                    SystemTime::now(),
                )
                .unwrap()
        })
    });
}

fn events(c: &mut Criterion) {
    let s = signer();
    let signed = event(&s, 1);
    let e = Event::decode(signed.event.as_slice()).unwrap();
    c.bench_function("event/encode_and_sign", |b| {
        b.iter(|| s.sign(black_box(&e)))
    });
    let key = s.verifying_key();
    c.bench_function("event/verify_strict_and_decode", |b| {
        b.iter(|| verify_event(black_box(&signed), &key).unwrap())
    });
    let mut g = c.benchmark_group("event/verify_batch");
    for n in [8usize, 64] {
        let batch: Vec<_> = (1..=n as u64).map(|seq| event(&s, seq)).collect();
        let msgs: Vec<&[u8]> = batch.iter().map(|e| e.event.as_slice()).collect();
        let sigs: Vec<Signature> = batch
            .iter()
            .map(|e| Signature::from_slice(&e.signature).unwrap())
            .collect();
        let keys = vec![key; n];
        g.throughput(Throughput::Elements(n as u64));
        g.bench_function(format!("{n}"), |b| {
            b.iter(|| ed25519_dalek::verify_batch(black_box(&msgs), &sigs, &keys).unwrap())
        });
    }
    g.finish();
}

/// Complete-subtree roots by level, as the audit store keeps them.
fn levels(n: usize) -> Vec<Vec<Hash>> {
    let mut levels = vec![
        (0..n as u64)
            .map(|i| leaf_hash(&i.to_be_bytes()))
            .collect::<Vec<_>>(),
    ];
    while levels.last().unwrap().len() > 1 {
        let prev = levels.last().unwrap();
        levels.push(
            prev.chunks_exact(2)
                .map(|p| node_hash(&p[0], &p[1]))
                .collect(),
        );
    }
    levels
}

fn merkle_bench(c: &mut Criterion) {
    let s = signer();
    let signed = event(&s, 1);
    let bytes = signed.encode_to_vec();
    c.bench_function("merkle/leaf_hash_300B", |b| {
        b.iter(|| leaf_hash(black_box(&bytes)))
    });

    // The real append: entry, indexes and completed subtree nodes in one
    // sled batch (no sync: that is the disk's part, measured by the load tool).
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path()).unwrap();
    let mut seq = 1;
    c.bench_function("merkle/append_to_sled_store", |b| {
        b.iter_batched(
            || {
                let signed = event(&s, seq);
                seq += 1;
                let e = Event::decode(signed.event.as_slice()).unwrap();
                let leaf = leaf_hash(&signed.encode_to_vec());
                (signed, e, leaf)
            },
            |(signed, e, leaf)| {
                let entry = LogEntry {
                    index: store.size(),
                    signed_event: Some(signed),
                    event: Some(e),
                    received_at: None,
                };
                store.append(&entry, &leaf).unwrap()
            },
            BatchSize::SmallInput,
        )
    });

    let n = (1usize << 20) + 12_345;
    let lv = levels(n);
    let mut mth = |start: u64, end: u64| {
        merkle::subtree_root::<merkle::MerkleError>(start, end, &mut |level, i| {
            Ok(lv[level as usize][i as usize])
        })
    };
    c.bench_function("merkle/inclusion_proof_1M_leaves", |b| {
        let mut i = 0u64;
        b.iter(|| {
            i = (i + 7919) % n as u64;
            merkle::inclusion_proof_with(i, n as u64, &mut mth).unwrap()
        })
    });
    c.bench_function("merkle/consistency_proof_1M_leaves", |b| {
        let mut m = 1u64;
        b.iter(|| {
            m = (m + 7919) % n as u64 + 1;
            merkle::consistency_proof_with(m, n as u64, &mut mth).unwrap()
        })
    });
}

/// What bounds the durable paths: a sled `apply_batch` (which the audit
/// store uses per event, and sled transactions use likewise) seals and
/// writes sled's IO buffer with a waiting `sync_file_range`; plain inserts
/// stay in memory until a flush.
fn sled_writes(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let db = sled::Config::new().path(dir.path()).open().unwrap();
    let tree = db.open_tree("t").unwrap();
    let value = vec![7u8; 300];
    let mut n = 0u64;
    c.bench_function("sled/apply_batch_6_keys", |b| {
        b.iter(|| {
            let mut batch = sled::Batch::default();
            for k in 0..6u64 {
                batch.insert(&(n * 8 + k).to_be_bytes(), value.as_slice());
            }
            n += 1;
            tree.apply_batch(batch).unwrap()
        })
    });
    c.bench_function("sled/insert_6_keys", |b| {
        b.iter(|| {
            for k in 0..6u64 {
                tree.insert((n * 8 + k).to_be_bytes(), value.as_slice())
                    .unwrap();
            }
            n += 1;
        })
    });
}

fn seed_open(c: &mut Criterion) {
    let key = MasterKey::new(SecretKey::from_bytes([5; 32]));
    let sealed = key.seal_seed("bench-root", &[1u8; 20]);
    c.bench_function("seed/xchacha20poly1305_open", |b| {
        b.iter(|| key.open_seed("bench-root", black_box(&sealed)).unwrap())
    });
}

criterion_group!(
    benches,
    totp,
    grants,
    events,
    merkle_bench,
    seed_open,
    sled_writes
);
criterion_main!(benches);
