//! Cloudflare's `tlog_tiles` and `signed_note` (crates.io 0.2.0, from
//! github.com/cloudflare/azul) run through twokey-tlog's known answers — the
//! RFC 6962 vectors, the Go `sumdb/note` vector — and against our own code,
//! so the adopt/not-adopt decision in ARCHITECTURE.md ("Crates we lean on")
//! rests on what they do.

use ed25519_dalek::{SigningKey, VerifyingKey};
use rand::{Rng, SeedableRng, rngs::StdRng};
use signed_note::{Note, StandardSigner, StandardVerifier, Verifier as _, VerifierList};
use tlog_tiles::{
    EMPTY_HASH, Error, Hash, HashReader, Tile, check_record, check_tree, prove_record, prove_tree,
    record_hash, stored_hashes, tree_hash,
};
use twokey_tlog::checkpoint::{Checkpoint, CheckpointSigner, NoteVerifier, key_id};
use twokey_tlog::merkle;

/// Stored hashes in Go's `sumdb/tlog` order (`stored_hash_index`), in memory.
#[derive(Default)]
struct Stored(Vec<Hash>);

impl HashReader for Stored {
    fn read_hashes(&self, indexes: &[u64]) -> Result<Vec<Hash>, Error> {
        indexes
            .iter()
            .map(|&i| {
                self.0
                    .get(i as usize)
                    .copied()
                    .ok_or(Error::IndexesNotInTree)
            })
            .collect()
    }
}

fn stored(records: &[Vec<u8>]) -> Stored {
    let mut s = Stored::default();
    for (n, data) in records.iter().enumerate() {
        let new = stored_hashes(n as u64, data, &s).unwrap();
        s.0.extend(new);
    }
    s
}

fn h(s: &str) -> Hash {
    Hash(hex::decode(s).unwrap().try_into().unwrap())
}

/// The eight leaves of the RFC 6962 vectors (transparency-dev/merkle `testonly`).
fn rfc_leaves() -> Vec<Vec<u8>> {
    [
        "",
        "00",
        "10",
        "2021",
        "3031",
        "40414243",
        "5051525354555657",
        "606162636465666768696a6b6c6d6e6f",
    ]
    .iter()
    .map(|s| hex::decode(s).unwrap())
    .collect()
}

const ROOTS: [&str; 8] = [
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
];

/// (leaf index, tree size, proof), transparency-dev/merkle `proof/verify_test.go`.
fn inclusion_vectors() -> Vec<(u64, u64, Vec<&'static str>)> {
    vec![
        (0, 1, vec![]),
        (
            0,
            8,
            vec![
                "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
                "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
                "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
            ],
        ),
        (
            5,
            8,
            vec![
                "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
                "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
                "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
            ],
        ),
        (
            2,
            3,
            vec!["fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125"],
        ),
        (
            1,
            5,
            vec![
                "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
                "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
                "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
            ],
        ),
    ]
}

/// (first size, second size, proof), transparency-dev/merkle `proof/verify_test.go`.
fn consistency_vectors() -> Vec<(u64, u64, Vec<&'static str>)> {
    vec![
        (1, 1, vec![]),
        (
            1,
            8,
            vec![
                "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
                "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
                "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
            ],
        ),
        (
            6,
            8,
            vec![
                "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
                "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
                "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
            ],
        ),
        (
            2,
            5,
            vec![
                "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
                "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
            ],
        ),
        (
            6,
            7,
            vec![
                "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
                "b08693ec2e721597130641e8211e7eedccb4c26413963eee6c1e2ed16ffb1a5f",
                "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
            ],
        ),
    ]
}

#[test]
fn their_merkle_code_passes_the_rfc6962_known_answers() {
    let leaves = rfc_leaves();
    let s = stored(&leaves);
    assert_eq!(
        tree_hash(0, &s).unwrap(),
        h("e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")
    );
    assert_eq!(EMPTY_HASH, tree_hash(0, &s).unwrap());
    for size in 1..=8u64 {
        assert_eq!(tree_hash(size, &s).unwrap(), h(ROOTS[size as usize - 1]));
    }
    for (index, size, want) in inclusion_vectors() {
        let want: Vec<Hash> = want.into_iter().map(h).collect();
        let proof = prove_record(size, index, &s).unwrap();
        assert_eq!(proof, want, "inclusion {index} in {size}");
        let root = h(ROOTS[size as usize - 1]);
        let leaf = record_hash(&leaves[index as usize]);
        check_record(&proof, size, root, index, leaf).unwrap();
        for i in 0..proof.len() {
            let mut bad = proof.clone();
            bad[i].0[0] ^= 1;
            assert!(check_record(&bad, size, root, index, leaf).is_err());
        }
        assert!(check_record(&proof, size, root, index, record_hash(b"x")).is_err());
    }
    for (first, second, want) in consistency_vectors() {
        let want: Vec<Hash> = want.into_iter().map(h).collect();
        let proof = prove_tree(second, first, &s).unwrap();
        assert_eq!(proof, want, "consistency {first} → {second}");
        let (old, new) = (h(ROOTS[first as usize - 1]), h(ROOTS[second as usize - 1]));
        check_tree(&proof, second, new, first, old).unwrap();
        for i in 0..proof.len() {
            let mut bad = proof.clone();
            bad[i].0[31] ^= 0x80;
            assert!(check_tree(&bad, second, new, first, old).is_err());
        }
    }
}

#[test]
fn their_roots_and_proofs_equal_ours_on_random_trees() {
    let mut rng = StdRng::seed_from_u64(17);
    let records: Vec<Vec<u8>> = (0..700u32)
        .map(|i| {
            let mut r = vec![0; rng.gen_range(0..300)];
            rng.fill(&mut r[..]);
            r.extend(i.to_be_bytes());
            r
        })
        .collect();
    let s = stored(&records);
    let ours: Vec<merkle::Hash> = records.iter().map(|r| merkle::leaf_hash(r)).collect();
    for (i, r) in records.iter().enumerate() {
        assert_eq!(record_hash(r).0, ours[i]);
    }
    for size in (1..=700u64)
        .step_by(7)
        .chain([255, 256, 257, 511, 512, 513])
    {
        let root = tree_hash(size, &s).unwrap();
        assert_eq!(
            root.0,
            merkle::root(&ours[..size as usize]),
            "root of {size}"
        );
        let index = rng.gen_range(0..size);
        let theirs = prove_record(size, index, &s).unwrap();
        let mine = merkle::inclusion_proof(&ours, index, size).unwrap();
        assert_eq!(
            theirs.iter().map(|x| x.0).collect::<Vec<_>>(),
            mine,
            "inclusion {index} in {size}"
        );
        let old = rng.gen_range(1..=size);
        let theirs = prove_tree(size, old, &s).unwrap();
        let mine = merkle::consistency_proof(&ours, old, size).unwrap();
        assert_eq!(
            theirs.iter().map(|x| x.0).collect::<Vec<_>>(),
            mine,
            "consistency {old} → {size}"
        );
    }
}

/// Tile *contents* are C2SP's (both come from Go's `sumdb/tlog`), but the
/// published crate writes and parses only Go's checksum-database paths
/// (`tile/<H>/<L>/…`, `tile/<H>/data/…`), not C2SP tlog-tiles' (`tile/<L>/…`,
/// `tile/entries/…`, height fixed at 8).
#[test]
fn their_tile_hashes_are_c2sp_but_their_paths_are_go_sumdb_paths() {
    let records: Vec<Vec<u8>> = (0..300u32).map(|i| i.to_be_bytes().to_vec()).collect();
    let s = stored(&records);
    let ours: Vec<merkle::Hash> = records.iter().map(|r| merkle::leaf_hash(r)).collect();

    // Level 0, tile 0, full: the 256 leaf hashes.
    let full = Tile::new(8, 0, 0, 256, false).read_data(&s).unwrap();
    assert_eq!(full, ours[..256].concat());
    // Level 0, tile 1, partial: the 44 leaf hashes after them.
    let partial = Tile::new(8, 0, 1, 44, false).read_data(&s).unwrap();
    assert_eq!(partial, ours[256..300].concat());
    // Level 1, tile 0, width 1: the root of the first 256 leaves.
    let level1 = Tile::new(8, 1, 0, 1, false).read_data(&s).unwrap();
    assert_eq!(level1, merkle::root(&ours[..256]).to_vec());

    let hash_tile = Tile::new(8, 0, 1_234_067, 256, false);
    assert_eq!(hash_tile.path(), "tile/8/0/x001/x234/067");
    let data_tile = Tile::new(8, 0, 1_234_067, 5, true);
    assert_eq!(data_tile.path(), "tile/8/data/x001/x234/067.p/5");
    for c2sp in [
        "tile/0/x001/x234/067",
        "tile/entries/x001/x234/067.p/5",
        "tile/1/000.p/1",
    ] {
        assert!(Tile::from_path(c2sp).is_err(), "{c2sp} parsed");
    }
}

// The key and note of golang.org/x/mod/sumdb/note's note_test.go.
const GO_VKEY: &str = "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW";
const GO_SKEY: &str =
    "PRIVATE+KEY+PeterNeumann+c74f20a3+AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz";
const GO_TEXT: &str = "If you think cryptography is the answer to your problem,\n\
                       then you don't know what your problem is.\n";
const GO_SIG: &str = "\u{2014} PeterNeumann x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqfqdngotpRZb6KE6RyyBwJnAM=\n";

fn go_seed() -> [u8; 32] {
    use base64::Engine as _;
    let raw = base64::engine::general_purpose::STANDARD
        .decode("AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz")
        .unwrap();
    raw[1..].try_into().unwrap()
}

fn sign_with_theirs(signer: &StandardSigner, text: &str) -> String {
    let mut note = Note::new(text.as_bytes(), &[]).unwrap();
    note.add_sigs(&[signer]).unwrap();
    String::from_utf8(note.to_bytes()).unwrap()
}

fn open_with_theirs(vkey: &str, note: &str) -> Result<String, signed_note::NoteError> {
    let verifier = StandardVerifier::new(vkey).unwrap();
    let list = VerifierList::new(vec![Box::new(verifier)]);
    let note = Note::from_bytes(note.as_bytes())?;
    note.verify(&list)?;
    Ok(String::from_utf8(note.text().to_vec()).unwrap())
}

#[test]
fn their_notes_match_the_go_reference_and_ours_byte_for_byte() {
    let theirs = StandardSigner::new(GO_SKEY).unwrap();
    assert_eq!(
        sign_with_theirs(&theirs, GO_TEXT),
        format!("{GO_TEXT}\n{GO_SIG}")
    );
    let verifier = StandardVerifier::new(GO_VKEY).unwrap();
    let ours = CheckpointSigner::new("PeterNeumann", SigningKey::from_bytes(&go_seed())).unwrap();
    assert_eq!(
        verifier.key_id(),
        key_id("PeterNeumann", ours.verifier().key())
    );

    // A checkpoint: the same bytes from both signers (ed25519 is
    // deterministic), so Go's check in audit/tests/receipts.rs covers theirs.
    let cp = Checkpoint {
        origin: "twokey.test/audit".into(),
        size: 1_234_567,
        root: [9; 32],
    };
    let ours_note = ours.sign(&cp).unwrap();
    assert_eq!(sign_with_theirs(&theirs, &cp.body()), ours_note);
    assert_eq!(open_with_theirs(GO_VKEY, &ours_note).unwrap(), cp.body());
    let parsed = tlog_tiles::Checkpoint::from_bytes(cp.body().as_bytes()).unwrap();
    assert_eq!(
        (parsed.origin(), parsed.size(), parsed.hash().0),
        ("twokey.test/audit", 1_234_567, [9; 32])
    );
    let altered = ours_note.replacen("1234567", "1234568", 1);
    assert!(open_with_theirs(GO_VKEY, &altered).is_err());
    assert!(
        NoteVerifier::parse(GO_VKEY)
            .unwrap()
            .open_checkpoint(&altered)
            .is_err()
    );
}

/// Their verifier uses ed25519-dalek's `verify`, ours `verify_strict`: a
/// "signature" under the small-order identity key, which verifies any text,
/// opens with theirs and is refused by ours.
#[test]
fn their_note_verifier_accepts_a_weak_key_that_ours_refuses() {
    let mut identity = [0u8; 32];
    identity[0] = 1;
    let weak = VerifyingKey::from_bytes(&identity).unwrap();
    assert!(weak.is_weak());
    let vkey = signed_note::new_ed25519_verifier_key("weak", &weak);
    let id = signed_note::key_id("weak", &[&[1u8][..], &identity].concat());
    let mut sig = id.to_be_bytes().to_vec();
    sig.extend(identity); // R = identity
    sig.extend([0u8; 32]); // s = 0
    use base64::Engine as _;
    let note = format!(
        "anything at all\n\n\u{2014} weak {}\n",
        base64::engine::general_purpose::STANDARD.encode(&sig)
    );
    assert_eq!(open_with_theirs(&vkey, &note).unwrap(), "anything at all\n");
    let refused = NoteVerifier::parse(&vkey).map(|v| v.open(&note).map(str::to_owned));
    assert!(
        !matches!(refused, Ok(Ok(_))),
        "twokey's verifier opened a note under a small-order key"
    );
}
