//! RFC 6962 / RFC 9162 Merkle tree hashing: leaf and node hashes, tree roots,
//! and the generation and verification of inclusion and consistency proofs.
//!
//! Generation works over any source of subtree roots (`mth(start, end)`), so
//! the store can answer from the complete subtrees it keeps on disk; the
//! slice helpers are the same algorithms over leaf hashes held in memory.

use sha2::{Digest, Sha256};

/// A SHA-256 hash.
pub type Hash = [u8; 32];

/// Why a proof or a request for one was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MerkleError {
    /// The leaf index is not inside the tree.
    #[error("leaf index {index} is outside a tree of size {size}")]
    IndexOutOfRange {
        /// The index asked for.
        index: u64,
        /// The tree size.
        size: u64,
    },
    /// The first size of a consistency proof is larger than the second.
    #[error("tree size {first} is larger than tree size {second}")]
    SizesOutOfOrder {
        /// The older size.
        first: u64,
        /// The newer size.
        second: u64,
    },
    /// A proof hash is not 32 bytes.
    #[error("proof hash {0} is not 32 bytes")]
    BadHashLength(usize),
    /// The proof has the wrong number of hashes for the sizes.
    #[error("proof has the wrong number of hashes")]
    WrongProofLength,
    /// The proof does not lead to the expected root.
    #[error("proof does not match the root hash")]
    RootMismatch,
}

/// The hash of the empty tree: SHA-256 of nothing.
pub fn empty_root() -> Hash {
    Sha256::digest([]).into()
}

/// RFC 6962 leaf hash: SHA-256(0x00 ‖ data).
pub fn leaf_hash(data: &[u8]) -> Hash {
    let mut h = Sha256::new();
    h.update([0u8]);
    h.update(data);
    h.finalize().into()
}

/// RFC 6962 interior node hash: SHA-256(0x01 ‖ left ‖ right).
pub fn node_hash(left: &Hash, right: &Hash) -> Hash {
    let mut h = Sha256::new();
    h.update([1u8]);
    h.update(left);
    h.update(right);
    h.finalize().into()
}

/// The largest power of two strictly smaller than `n` (`n` ≥ 2).
fn split_point(n: u64) -> u64 {
    debug_assert!(n >= 2);
    1 << (63 - (n - 1).leading_zeros())
}

/// The root of the subtree of leaves `[start, end)` from the roots of the
/// complete, aligned subtrees it is made of: `node(level, i)` must return the
/// root of leaves `[i << level, (i + 1) << level)`.
pub fn subtree_root<E>(
    start: u64,
    end: u64,
    node: &mut impl FnMut(u32, u64) -> Result<Hash, E>,
) -> Result<Hash, E> {
    let n = end - start;
    if n == 0 {
        return Ok(empty_root());
    }
    if n.is_power_of_two() && start.is_multiple_of(n) {
        let level = n.trailing_zeros();
        return node(level, start >> level);
    }
    let k = split_point(n);
    let left = subtree_root(start, start + k, node)?;
    let right = subtree_root(start + k, end, node)?;
    Ok(node_hash(&left, &right))
}

/// The root of a tree over `leaves` (leaf hashes).
pub fn root(leaves: &[Hash]) -> Hash {
    match leaves.len() {
        0 => empty_root(),
        1 => leaves[0],
        n => {
            let k = split_point(n as u64) as usize;
            node_hash(&root(&leaves[..k]), &root(&leaves[k..]))
        }
    }
}

/// The root of a growing list of leaves without keeping them: the roots of
/// the complete subtrees the leaves so far are made of (one per set bit of
/// the count, largest first), as a log's verifier or a rehash at start-up
/// needs.
#[derive(Debug, Clone, Default)]
pub struct RootBuilder {
    /// (level, root) of each complete subtree, left to right.
    stack: Vec<(u32, Hash)>,
    size: u64,
}

impl RootBuilder {
    /// No leaves yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Leaves pushed so far.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Adds the leaf hash `leaf`.
    pub fn push(&mut self, leaf: Hash) {
        let mut top = (0u32, leaf);
        while let Some(&(level, left)) = self.stack.last() {
            if level != top.0 {
                break;
            }
            self.stack.pop();
            top = (level + 1, node_hash(&left, &top.1));
        }
        self.stack.push(top);
        self.size += 1;
    }

    /// The RFC 6962 root of the leaves pushed so far.
    pub fn root(&self) -> Hash {
        let mut subtrees = self.stack.iter().rev();
        let Some(&(_, mut hash)) = subtrees.next() else {
            return empty_root();
        };
        for (_, left) in subtrees {
            hash = node_hash(left, &hash);
        }
        hash
    }
}

/// Inclusion proof (RFC 6962 §2.1.1 PATH) for leaf `index` in a tree of
/// `size` leaves, from a source of subtree roots `mth(start, end)`; hashes
/// from the leaf up.
pub fn inclusion_proof_with<E: From<MerkleError>>(
    index: u64,
    size: u64,
    mth: &mut impl FnMut(u64, u64) -> Result<Hash, E>,
) -> Result<Vec<Hash>, E> {
    if index >= size {
        return Err(MerkleError::IndexOutOfRange { index, size }.into());
    }
    let mut out = Vec::new();
    path(index, 0, size, mth, &mut out)?;
    Ok(out)
}

fn path<E>(
    m: u64,
    start: u64,
    end: u64,
    mth: &mut impl FnMut(u64, u64) -> Result<Hash, E>,
    out: &mut Vec<Hash>,
) -> Result<(), E> {
    let n = end - start;
    if n <= 1 {
        return Ok(());
    }
    let k = split_point(n);
    if m < k {
        path(m, start, start + k, mth, out)?;
        out.push(mth(start + k, end)?);
    } else {
        path(m - k, start + k, end, mth, out)?;
        out.push(mth(start, start + k)?);
    }
    Ok(())
}

/// Consistency proof (RFC 6962 §2.1.2 PROOF) between trees of `first` and
/// `second` leaves; empty when `first` is 0 or equals `second`.
pub fn consistency_proof_with<E: From<MerkleError>>(
    first: u64,
    second: u64,
    mth: &mut impl FnMut(u64, u64) -> Result<Hash, E>,
) -> Result<Vec<Hash>, E> {
    if first > second {
        return Err(MerkleError::SizesOutOfOrder { first, second }.into());
    }
    let mut out = Vec::new();
    if first > 0 && first < second {
        subproof(first, 0, second, true, mth, &mut out)?;
    }
    Ok(out)
}

fn subproof<E>(
    m: u64,
    start: u64,
    end: u64,
    complete: bool,
    mth: &mut impl FnMut(u64, u64) -> Result<Hash, E>,
    out: &mut Vec<Hash>,
) -> Result<(), E> {
    let n = end - start;
    if m == n {
        if !complete {
            out.push(mth(start, end)?);
        }
        return Ok(());
    }
    let k = split_point(n);
    if m <= k {
        subproof(m, start, start + k, complete, mth, out)?;
        out.push(mth(start + k, end)?);
    } else {
        subproof(m - k, start + k, end, false, mth, out)?;
        out.push(mth(start, start + k)?);
    }
    Ok(())
}

fn slice_mth(leaves: &[Hash]) -> impl FnMut(u64, u64) -> Result<Hash, MerkleError> + '_ {
    |start, end| Ok(root(&leaves[start as usize..end as usize]))
}

/// Inclusion proof for leaf `index` in the tree over the first `size` of `leaves`.
pub fn inclusion_proof(leaves: &[Hash], index: u64, size: u64) -> Result<Vec<Hash>, MerkleError> {
    if size > leaves.len() as u64 {
        return Err(MerkleError::IndexOutOfRange {
            index: size,
            size: leaves.len() as u64,
        });
    }
    inclusion_proof_with(index, size, &mut slice_mth(leaves))
}

/// Consistency proof between the trees over the first `first` and `second` of `leaves`.
pub fn consistency_proof(
    leaves: &[Hash],
    first: u64,
    second: u64,
) -> Result<Vec<Hash>, MerkleError> {
    if second > leaves.len() as u64 {
        return Err(MerkleError::IndexOutOfRange {
            index: second,
            size: leaves.len() as u64,
        });
    }
    consistency_proof_with(first, second, &mut slice_mth(leaves))
}

/// Proof hashes from their wire form, refusing any that is not 32 bytes.
pub fn hashes_from_bytes(hashes: &[Vec<u8>]) -> Result<Vec<Hash>, MerkleError> {
    hashes
        .iter()
        .map(|h| Hash::try_from(h.as_slice()).map_err(|_| MerkleError::BadHashLength(h.len())))
        .collect()
}

/// The root an inclusion proof leads to (RFC 9162 §2.1.3.2).
pub fn root_from_inclusion_proof(
    index: u64,
    size: u64,
    leaf: &Hash,
    proof: &[Hash],
) -> Result<Hash, MerkleError> {
    if index >= size {
        return Err(MerkleError::IndexOutOfRange { index, size });
    }
    let (mut f, mut s) = (index, size - 1);
    let mut r = *leaf;
    for p in proof {
        if s == 0 {
            return Err(MerkleError::WrongProofLength);
        }
        if f & 1 == 1 || f == s {
            r = node_hash(p, &r);
            if f & 1 == 0 {
                while f & 1 == 0 && f != 0 {
                    f >>= 1;
                    s >>= 1;
                }
            }
        } else {
            r = node_hash(&r, p);
        }
        f >>= 1;
        s >>= 1;
    }
    if s != 0 {
        return Err(MerkleError::WrongProofLength);
    }
    Ok(r)
}

/// Checks that `leaf` is at `index` in the tree of `size` leaves with `root`.
pub fn verify_inclusion(
    index: u64,
    size: u64,
    leaf: &Hash,
    proof: &[Hash],
    root: &Hash,
) -> Result<(), MerkleError> {
    if root_from_inclusion_proof(index, size, leaf, proof)? == *root {
        Ok(())
    } else {
        Err(MerkleError::RootMismatch)
    }
}

/// Checks that the tree of `first` leaves with `first_root` is a prefix of
/// the tree of `second` leaves with `second_root` (RFC 9162 §2.1.4.2).
pub fn verify_consistency(
    first: u64,
    second: u64,
    proof: &[Hash],
    first_root: &Hash,
    second_root: &Hash,
) -> Result<(), MerkleError> {
    if first > second {
        return Err(MerkleError::SizesOutOfOrder { first, second });
    }
    if first == second {
        if !proof.is_empty() {
            return Err(MerkleError::WrongProofLength);
        }
        return if first_root == second_root {
            Ok(())
        } else {
            Err(MerkleError::RootMismatch)
        };
    }
    if first == 0 {
        // Every tree extends the empty tree.
        return if proof.is_empty() {
            Ok(())
        } else {
            Err(MerkleError::WrongProofLength)
        };
    }
    if proof.is_empty() {
        return Err(MerkleError::WrongProofLength);
    }
    let mut path: Vec<Hash> = Vec::with_capacity(proof.len() + 1);
    if first.is_power_of_two() {
        path.push(*first_root);
    }
    path.extend_from_slice(proof);
    let (mut f, mut s) = (first - 1, second - 1);
    while f & 1 == 1 {
        f >>= 1;
        s >>= 1;
    }
    let (mut fr, mut sr) = (path[0], path[0]);
    for c in &path[1..] {
        if s == 0 {
            return Err(MerkleError::WrongProofLength);
        }
        if f & 1 == 1 || f == s {
            fr = node_hash(c, &fr);
            sr = node_hash(c, &sr);
            if f & 1 == 0 {
                while f & 1 == 0 && f != 0 {
                    f >>= 1;
                    s >>= 1;
                }
            }
        } else {
            sr = node_hash(&sr, c);
        }
        f >>= 1;
        s >>= 1;
    }
    if s != 0 {
        return Err(MerkleError::WrongProofLength);
    }
    if fr == *first_root && sr == *second_root {
        Ok(())
    } else {
        Err(MerkleError::RootMismatch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn h(s: &str) -> Hash {
        hex::decode(s).unwrap().try_into().unwrap()
    }

    /// The eight leaves of the RFC 6962 test vectors (transparency-dev/merkle `testonly`).
    fn leaf_inputs() -> Vec<Vec<u8>> {
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

    fn leaves() -> Vec<Hash> {
        leaf_inputs().iter().map(|d| leaf_hash(d)).collect()
    }

    /// Roots of the trees over the first 1..=8 leaves.
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

    fn root_of(size: u64) -> Hash {
        h(ROOTS[size as usize - 1])
    }

    /// (leaf index, tree size, proof) from transparency-dev/merkle `proof/verify_test.go`.
    fn inclusion_vectors() -> Vec<(u64, u64, Vec<Hash>)> {
        vec![
            (0, 1, vec![]),
            (
                0,
                8,
                vec![
                    h("96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7"),
                    h("5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e"),
                    h("6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4"),
                ],
            ),
            (
                5,
                8,
                vec![
                    h("bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b"),
                    h("ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0"),
                    h("d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"),
                ],
            ),
            (
                2,
                3,
                vec![h(
                    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
                )],
            ),
            (
                1,
                5,
                vec![
                    h("6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d"),
                    h("5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e"),
                    h("bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b"),
                ],
            ),
        ]
    }

    /// (first size, second size, proof) from transparency-dev/merkle `proof/verify_test.go`.
    fn consistency_vectors() -> Vec<(u64, u64, Vec<Hash>)> {
        vec![
            (1, 1, vec![]),
            (
                1,
                8,
                vec![
                    h("96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7"),
                    h("5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e"),
                    h("6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4"),
                ],
            ),
            (
                6,
                8,
                vec![
                    h("0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a"),
                    h("ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0"),
                    h("d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"),
                ],
            ),
            (
                2,
                5,
                vec![
                    h("5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e"),
                    h("bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b"),
                ],
            ),
            (
                6,
                7,
                vec![
                    h("0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a"),
                    h("b08693ec2e721597130641e8211e7eedccb4c26413963eee6c1e2ed16ffb1a5f"),
                    h("d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"),
                ],
            ),
        ]
    }

    const SOME_HASH: &str = "abacaba000000000000000000000000000000000000000000060061e00123456";

    #[test]
    fn roots_match_the_rfc6962_known_answers() {
        let leaves = leaves();
        assert_eq!(
            hex::encode(empty_root()),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(root(&[]), empty_root());
        for size in 1..=8u64 {
            assert_eq!(root(&leaves[..size as usize]), root_of(size), "size {size}");
        }
    }

    #[test]
    fn subtree_roots_from_complete_nodes_match_the_known_answers() {
        let leaves = leaves();
        let mut node = |level: u32, i: u64| -> Result<Hash, ()> {
            let start = (i << level) as usize;
            Ok(root(&leaves[start..start + (1 << level)]))
        };
        for size in 1..=8u64 {
            assert_eq!(subtree_root(0, size, &mut node).unwrap(), root_of(size));
        }
    }

    #[test]
    fn generated_proofs_match_the_known_answers() {
        let leaves = leaves();
        for (index, size, want) in inclusion_vectors() {
            assert_eq!(
                inclusion_proof(&leaves, index, size).unwrap(),
                want,
                "inclusion {index} in {size}"
            );
        }
        for (first, second, want) in consistency_vectors() {
            assert_eq!(
                consistency_proof(&leaves, first, second).unwrap(),
                want,
                "consistency {first} → {second}"
            );
        }
    }

    #[test]
    fn known_inclusion_proofs_verify_and_every_corruption_is_rejected() {
        let leaves = leaves();
        for (index, size, proof) in inclusion_vectors() {
            let root = root_of(size);
            let leaf = leaves[index as usize];
            verify_inclusion(index, size, &leaf, &proof, &root).unwrap();

            let mut probes: Vec<(String, u64, u64, Hash, Vec<Hash>, Hash)> = vec![
                (
                    "index - 1".into(),
                    index.wrapping_sub(1),
                    size,
                    leaf,
                    proof.clone(),
                    root,
                ),
                (
                    "index + 1".into(),
                    index + 1,
                    size,
                    leaf,
                    proof.clone(),
                    root,
                ),
                (
                    "index ^ 2".into(),
                    index ^ 2,
                    size,
                    leaf,
                    proof.clone(),
                    root,
                ),
                (
                    "size * 2".into(),
                    index,
                    size * 2,
                    leaf,
                    proof.clone(),
                    root,
                ),
                (
                    "size / 2".into(),
                    index,
                    size / 2,
                    leaf,
                    proof.clone(),
                    root,
                ),
                (
                    "wrong leaf".into(),
                    index,
                    size,
                    h(SOME_HASH),
                    proof.clone(),
                    root,
                ),
                (
                    "empty root".into(),
                    index,
                    size,
                    leaf,
                    proof.clone(),
                    empty_root(),
                ),
                (
                    "random root".into(),
                    index,
                    size,
                    leaf,
                    proof.clone(),
                    h(SOME_HASH),
                ),
                (
                    "root of another size".into(),
                    index,
                    size,
                    leaf,
                    proof.clone(),
                    root_of(size % 8 + 1),
                ),
                (
                    "extended with root".into(),
                    index,
                    size,
                    leaf,
                    [proof.clone(), vec![root]].concat(),
                    root,
                ),
                (
                    "extended with zeros".into(),
                    index,
                    size,
                    leaf,
                    [proof.clone(), vec![[0; 32]]].concat(),
                    root,
                ),
                (
                    "prefixed with root".into(),
                    index,
                    size,
                    leaf,
                    [vec![root], proof.clone()].concat(),
                    root,
                ),
            ];
            if !proof.is_empty() {
                probes.push((
                    "truncated".into(),
                    index,
                    size,
                    leaf,
                    proof[..proof.len() - 1].to_vec(),
                    root,
                ));
                probes.push(("empty proof".into(), index, size, leaf, vec![], root));
            }
            if proof.len() > 1 {
                let mut swapped = proof.clone();
                swapped.swap(0, 1);
                probes.push(("swapped hashes".into(), index, size, leaf, swapped, root));
            }
            for i in 0..proof.len() {
                for bit in [0u8, 3, 7] {
                    let mut p = proof.clone();
                    p[i][31] ^= 1 << bit;
                    probes.push((
                        format!("proof[{i}] bit {bit} flipped"),
                        index,
                        size,
                        leaf,
                        p,
                        root,
                    ));
                }
            }
            for (what, i, s, l, p, r) in probes {
                if (i, s, l, &p, r) == (index, size, leaf, &proof, root) {
                    continue;
                }
                assert!(
                    verify_inclusion(i, s, &l, &p, &r).is_err(),
                    "inclusion {index} in {size}: {what} accepted"
                );
            }
        }
    }

    #[test]
    fn known_consistency_proofs_verify_and_every_corruption_is_rejected() {
        for (first, second, proof) in consistency_vectors() {
            let (r1, r2) = (root_of(first), root_of(second));
            verify_consistency(first, second, &proof, &r1, &r2).unwrap();
            if proof.is_empty() {
                continue;
            }
            let mut probes: Vec<(String, u64, u64, Vec<Hash>, Hash, Hash)> = vec![
                ("first - 1".into(), first - 1, second, proof.clone(), r1, r2),
                ("first + 1".into(), first + 1, second, proof.clone(), r1, r2),
                ("first ^ 2".into(), first ^ 2, second, proof.clone(), r1, r2),
                (
                    "second * 2".into(),
                    first,
                    second * 2,
                    proof.clone(),
                    r1,
                    r2,
                ),
                (
                    "second / 2".into(),
                    first,
                    second / 2,
                    proof.clone(),
                    r1,
                    r2,
                ),
                (
                    "wrong first root".into(),
                    first,
                    second,
                    proof.clone(),
                    h(SOME_HASH),
                    r2,
                ),
                (
                    "wrong second root".into(),
                    first,
                    second,
                    proof.clone(),
                    r1,
                    h(SOME_HASH),
                ),
                ("swapped roots".into(), first, second, proof.clone(), r2, r1),
                ("empty proof".into(), first, second, vec![], r1, r2),
                (
                    "truncated".into(),
                    first,
                    second,
                    proof[..proof.len() - 1].to_vec(),
                    r1,
                    r2,
                ),
                (
                    "extended with zeros".into(),
                    first,
                    second,
                    [proof.clone(), vec![[0; 32]]].concat(),
                    r1,
                    r2,
                ),
                (
                    "extended with root 1".into(),
                    first,
                    second,
                    [proof.clone(), vec![r1]].concat(),
                    r1,
                    r2,
                ),
                (
                    "extended with root 2".into(),
                    first,
                    second,
                    [proof.clone(), vec![r2]].concat(),
                    r1,
                    r2,
                ),
                (
                    "prefixed with root 1".into(),
                    first,
                    second,
                    [vec![r1], proof.clone()].concat(),
                    r1,
                    r2,
                ),
                (
                    "prefixed with root 2".into(),
                    first,
                    second,
                    [vec![r2], proof.clone()].concat(),
                    r1,
                    r2,
                ),
                (
                    "prefixed with proof[0]".into(),
                    first,
                    second,
                    [vec![proof[0]], proof.clone()].concat(),
                    r1,
                    r2,
                ),
            ];
            if proof.len() > 1 {
                let mut swapped = proof.clone();
                swapped.swap(0, 1);
                probes.push(("swapped hashes".into(), first, second, swapped, r1, r2));
            }
            for i in 0..proof.len() {
                for bit in [0u8, 4, 7] {
                    let mut p = proof.clone();
                    p[i][0] ^= 1 << bit;
                    probes.push((
                        format!("proof[{i}] bit {bit} flipped"),
                        first,
                        second,
                        p,
                        r1,
                        r2,
                    ));
                }
            }
            for (what, f, s, p, a, b) in probes {
                assert!(
                    verify_consistency(f, s, &p, &a, &b).is_err(),
                    "consistency {first} → {second}: {what} accepted"
                );
            }
        }
    }

    #[test]
    fn degenerate_consistency_cases_follow_the_reference() {
        let (a, b) = (h(SOME_HASH), empty_root());
        assert!(verify_consistency(0, 0, &[], &a, &a).is_ok());
        assert!(verify_consistency(0, 1, &[], &a, &b).is_ok());
        assert!(verify_consistency(1, 1, &[], &b, &b).is_ok());
        assert!(verify_consistency(1, 1, &[], &a, &b).is_err());
        assert!(verify_consistency(1, 0, &[], &a, &b).is_err());
        assert!(verify_consistency(2, 1, &[], &a, &b).is_err());
        assert!(verify_consistency(1, 2, &[], &a, &b).is_err());
        assert!(verify_consistency(0, 1, &[b], &b, &b).is_err());
        assert!(verify_consistency(1, 1, &[b], &b, &b).is_err());
    }

    #[test]
    fn inclusion_outside_the_tree_is_refused() {
        let leaves = leaves();
        for (index, size) in [(0, 0), (1, 0), (2, 1), (8, 8)] {
            assert!(inclusion_proof(&leaves, index, size).is_err());
            assert!(verify_inclusion(index, size, &leaves[0], &[], &empty_root()).is_err());
        }
        assert!(inclusion_proof(&leaves, 0, 9).is_err());
        assert!(consistency_proof(&leaves, 3, 2).is_err());
        assert!(hashes_from_bytes(&[vec![0; 31]]).is_err());
    }

    #[test]
    fn the_root_builder_gives_every_prefix_root() {
        let leaves: Vec<Hash> = (0..70u64).map(|i| leaf_hash(&i.to_be_bytes())).collect();
        let mut builder = RootBuilder::new();
        assert_eq!(builder.root(), empty_root());
        for (i, leaf) in leaves.iter().enumerate() {
            builder.push(*leaf);
            assert_eq!(builder.size(), i as u64 + 1);
            assert_eq!(builder.root(), root(&leaves[..=i]), "size {}", i + 1);
        }
    }

    proptest! {
        #[test]
        fn proofs_for_random_tree_sizes_verify(
            size in 1u64..300,
            index_seed in any::<u64>(),
            first_seed in any::<u64>(),
        ) {
            let leaves: Vec<Hash> = (0..size).map(|i| leaf_hash(&i.to_be_bytes())).collect();
            let index = index_seed % size;
            let root_n = root(&leaves);
            let proof = inclusion_proof(&leaves, index, size).unwrap();
            prop_assert!(verify_inclusion(index, size, &leaves[index as usize], &proof, &root_n).is_ok());
            if size > 1 {
                let other = (index + 1) % size;
                prop_assert!(verify_inclusion(other, size, &leaves[index as usize], &proof, &root_n).is_err());
            }

            let first = first_seed % (size + 1);
            let root_m = root(&leaves[..first as usize]);
            let proof = consistency_proof(&leaves, first, size).unwrap();
            prop_assert!(verify_consistency(first, size, &proof, &root_m, &root_n).is_ok());
            if first > 0 && first < size {
                let mut bad = proof.clone();
                bad[0][5] ^= 0x10;
                prop_assert!(verify_consistency(first, size, &bad, &root_m, &root_n).is_err());
            }

            let mut node = |level: u32, i: u64| -> Result<Hash, ()> {
                let start = (i << level) as usize;
                Ok(root(&leaves[start..start + (1 << level)]))
            };
            prop_assert_eq!(subtree_root(0, size, &mut node).unwrap(), root_n);
        }
    }
}
