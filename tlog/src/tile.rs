//! C2SP `tlog-tiles` arithmetic, pure: which tile holds a Merkle node, the
//! resource path of a tile (`tile/<L>/<N>[.p/<W>]`, `tile/entries/<N>[.p/<W>]`
//! with N as `x001/x234/067`), the hashes of a tile's inner levels, and entry
//! bundles (each entry a big-endian `uint16` length, then its bytes).
//!
//! Tiles have height 8: a full tile holds 256 hashes. The hashes of tile
//! level `L` are the Merkle nodes of level `8·L`; a node of level `8·L + r`
//! (`r < 8`) is the root of `2^r` consecutive hashes of one tile of level `L`.

use crate::merkle::{Hash, node_hash};

/// Tile height: levels of the Merkle tree one tile spans.
pub const HEIGHT: u32 = 8;

/// Hashes (or entries) in a full tile.
pub const WIDTH: u64 = 1 << HEIGHT;

/// The largest entry an entry bundle holds: its length is a `uint16`.
pub const MAX_ENTRY_BYTES: usize = u16::MAX as usize;

/// Tile levels: 2^(8·8) leaves is beyond any `u64` size.
pub const MAX_LEVEL: u8 = 7;

/// What a tile holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    /// Merkle hashes of tile level `L` (tree level `8·L`).
    Hashes(u8),
    /// Entries (an entry bundle), aligned with level 0.
    Entries,
}

/// One tile resource: what it holds, its index in its level, and its width
/// (1 to 255 for a partial tile, 256 for a full one).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Tile {
    /// What it holds.
    pub kind: Kind,
    /// Its index within its level.
    pub index: u64,
    /// Hashes or entries in it.
    pub width: u16,
}

impl Tile {
    /// Whether the tile is full.
    pub fn is_full(&self) -> bool {
        u64::from(self.width) == WIDTH
    }

    /// Its path below the log's prefix, as C2SP `tlog-tiles` names it:
    /// `tile/0/x001/x234/067.p/5`, `tile/entries/000`.
    pub fn path(&self) -> String {
        let mut path = match self.kind {
            Kind::Hashes(level) => format!("tile/{level}/"),
            Kind::Entries => "tile/entries/".to_owned(),
        };
        path.push_str(&index_path(self.index));
        if !self.is_full() {
            path.push_str(&format!(".p/{}", self.width));
        }
        path
    }

    /// The tile a path names, if it is a valid C2SP tile path (exactly as
    /// [`Tile::path`] writes it: no leading zeroes in L or W, 3-digit
    /// elements, `x` on all but the last).
    pub fn parse(path: &str) -> Option<Self> {
        let rest = path.strip_prefix("tile/")?;
        let (kind, rest) = rest.split_once('/')?;
        let kind = if kind == "entries" {
            Kind::Entries
        } else {
            let level = decimal(kind)?;
            if level > u64::from(MAX_LEVEL) {
                return None;
            }
            Kind::Hashes(level as u8)
        };
        let (n, width) = match rest.split_once(".p/") {
            Some((n, w)) => {
                let w = decimal(w)?;
                if w == 0 || w >= WIDTH {
                    return None;
                }
                (n, w as u16)
            }
            None => (rest, WIDTH as u16),
        };
        let index = parse_index_path(n)?;
        Some(Self { kind, index, width })
    }
}

/// A decimal number without leading zeroes (or `0`).
fn decimal(s: &str) -> Option<u64> {
    if s.is_empty() || (s.len() > 1 && s.starts_with('0')) || !s.bytes().all(|b| b.is_ascii_digit())
    {
        return None;
    }
    s.parse().ok()
}

/// `n` as C2SP path elements: zero-padded groups of 3 digits, all but the
/// last prefixed with `x` (1234067 → `x001/x234/067`).
pub fn index_path(n: u64) -> String {
    let mut groups = vec![n % 1000];
    let mut rest = n / 1000;
    while rest > 0 {
        groups.push(rest % 1000);
        rest /= 1000;
    }
    let mut path = String::new();
    for (i, g) in groups.iter().rev().enumerate() {
        if i > 0 {
            path.push('/');
        }
        if i + 1 < groups.len() {
            path.push('x');
        }
        path.push_str(&format!("{g:03}"));
    }
    path
}

fn parse_index_path(s: &str) -> Option<u64> {
    let parts: Vec<&str> = s.split('/').collect();
    let mut n: u64 = 0;
    for (i, part) in parts.iter().enumerate() {
        let digits = if i + 1 < parts.len() {
            part.strip_prefix('x')?
        } else {
            part
        };
        if digits.len() != 3 || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        // A leading group of 000 would be a second spelling of the index.
        if i == 0 && parts.len() > 1 && digits == "000" {
            return None;
        }
        n = n.checked_mul(1000)?.checked_add(digits.parse().ok()?)?;
    }
    Some(n)
}

/// Hashes of tile level `level` in a tree of `size` leaves: complete
/// subtrees of `256^level` leaves.
pub fn hashes_at(level: u8, size: u64) -> u64 {
    size.checked_shr(HEIGHT * u32::from(level)).unwrap_or(0)
}

/// The tiles of level `level` (or of entries) a tree of `size` leaves has
/// on its right edge: the last full tile, if any, and the partial tile, if
/// any (C2SP: a partial tile of width `floor(size / 256^level) mod 256`).
pub fn edge(kind: Kind, size: u64) -> (Option<Tile>, Option<Tile>) {
    let level = match kind {
        Kind::Hashes(l) => l,
        Kind::Entries => 0,
    };
    let count = hashes_at(level, size);
    let full = count / WIDTH;
    let width = (count % WIDTH) as u16;
    let last_full = (full > 0).then(|| Tile {
        kind,
        index: full - 1,
        width: WIDTH as u16,
    });
    let partial = (width > 0).then_some(Tile {
        kind,
        index: full,
        width,
    });
    (last_full, partial)
}

/// Tile levels a tree of `size` leaves has (at least 1 for a non-empty
/// tree): level `L` exists while `256^L <= size`.
pub fn levels(size: u64) -> u8 {
    let mut n = 0u8;
    while n <= MAX_LEVEL && hashes_at(n, size) > 0 {
        n += 1;
    }
    n
}

/// Where the Merkle node of `level` and `index` (the root of leaves
/// `[index << level, (index + 1) << level)`) is found: in tile `tile`
/// (index in tile level `level / 8`), as the root of the `count` hashes
/// starting at `offset`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeAt {
    /// Tile level.
    pub tile_level: u8,
    /// Tile index in that level.
    pub tile: u64,
    /// First hash in the tile.
    pub offset: usize,
    /// Hashes (a power of two, at most 128).
    pub count: usize,
}

/// The tile hashes that make the Merkle node `level`/`index`.
pub fn node_at(level: u32, index: u64) -> NodeAt {
    let tile_level = (level / HEIGHT) as u8;
    let r = level % HEIGHT;
    let first = index << r;
    NodeAt {
        tile_level,
        tile: first / WIDTH,
        offset: (first % WIDTH) as usize,
        count: 1 << r,
    }
}

/// The root of `hashes` (a power of two of them): the node their complete
/// subtree makes.
pub fn subtree_of(hashes: &[Hash]) -> Result<Hash, TileError> {
    if hashes.is_empty() || !hashes.len().is_power_of_two() {
        return Err(TileError::NotASubtree(hashes.len()));
    }
    let mut level: Vec<Hash> = hashes.to_vec();
    while level.len() > 1 {
        level = level
            .chunks_exact(2)
            .map(|p| node_hash(&p[0], &p[1]))
            .collect();
    }
    Ok(level[0])
}

/// A hash tile's bytes: its hashes concatenated.
pub fn hash_tile_bytes(hashes: &[Hash]) -> Vec<u8> {
    hashes.concat()
}

/// The hashes of a hash tile's bytes, which must be a whole number of
/// hashes, 1 to 256 of them.
pub fn parse_hash_tile(bytes: &[u8]) -> Result<Vec<Hash>, TileError> {
    if bytes.is_empty() || !bytes.len().is_multiple_of(32) || bytes.len() as u64 > 32 * WIDTH {
        return Err(TileError::HashTileLength(bytes.len()));
    }
    Ok(bytes
        .chunks_exact(32)
        .map(|c| c.try_into().expect("32-byte chunk"))
        .collect())
}

/// Why hashes or bytes are not a tile.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TileError {
    /// Not a power of two of hashes.
    #[error("{0} hashes do not make one complete subtree")]
    NotASubtree(usize),
    /// Not a whole number of hashes, or too many.
    #[error("a hash tile of {0} bytes is not 1 to 256 hashes of 32 bytes")]
    HashTileLength(usize),
}

/// Why bytes are not an entry or an entry bundle.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BundleError {
    /// An entry longer than a `uint16` length can say.
    #[error(
        "an entry of {0} bytes is larger than the {MAX_ENTRY_BYTES} bytes an entry bundle holds"
    )]
    TooLarge(usize),
    /// A length that runs past the end of the bundle.
    #[error("entry {entry} of the bundle runs past its end ({len} bytes at offset {offset})")]
    Truncated {
        /// Which entry.
        entry: usize,
        /// Its length prefix.
        len: usize,
        /// Where its bytes start.
        offset: usize,
    },
}

/// Appends `entry` to an entry bundle under construction.
pub fn push_entry(bundle: &mut Vec<u8>, entry: &[u8]) -> Result<(), BundleError> {
    let len = u16::try_from(entry.len()).map_err(|_| BundleError::TooLarge(entry.len()))?;
    bundle.extend_from_slice(&len.to_be_bytes());
    bundle.extend_from_slice(entry);
    Ok(())
}

/// The entries of a bundle, in order.
pub fn bundle_entries(bundle: &[u8]) -> Result<Vec<&[u8]>, BundleError> {
    let mut entries = Vec::new();
    let mut at = 0;
    while at < bundle.len() {
        let truncated = |len| BundleError::Truncated {
            entry: entries.len(),
            len,
            offset: at + 2,
        };
        if at + 2 > bundle.len() {
            return Err(truncated(0));
        }
        let len = usize::from(u16::from_be_bytes([bundle[at], bundle[at + 1]]));
        let end = at + 2 + len;
        if end > bundle.len() {
            return Err(truncated(len));
        }
        entries.push(&bundle[at + 2..end]);
        at = end;
    }
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::merkle::{leaf_hash, root, subtree_root};

    #[test]
    fn index_paths_are_the_c2sp_encoding() {
        assert_eq!(index_path(0), "000");
        assert_eq!(index_path(5), "005");
        assert_eq!(index_path(999), "999");
        assert_eq!(index_path(1000), "x001/000");
        assert_eq!(index_path(1_234_067), "x001/x234/067");
        for n in [0, 7, 999, 1000, 1_234_067, u64::MAX] {
            assert_eq!(parse_index_path(&index_path(n)), Some(n), "{n}");
        }
    }

    #[test]
    fn tile_paths_round_trip_and_other_spellings_are_refused() {
        let cases = [
            (Kind::Hashes(0), 1_234_067, 256, "tile/0/x001/x234/067"),
            (Kind::Hashes(1), 0, 17, "tile/1/000.p/17"),
            (Kind::Entries, 273, 112, "tile/entries/273.p/112"),
            (Kind::Entries, 0, 256, "tile/entries/000"),
        ];
        for (kind, index, width, path) in cases {
            let tile = Tile { kind, index, width };
            assert_eq!(tile.path(), path);
            assert_eq!(Tile::parse(path), Some(tile));
        }
        for bad in [
            "tile/0/0",
            "tile/00/000",
            "tile/0/x000/001",
            "tile/0/001/001",
            "tile/0/000.p/0",
            "tile/0/000.p/256",
            "tile/0/000.p/05",
            "tile/8/000",
            "tile/entries/x1/000",
            "tile/0/../000",
            "tile/data/000",
            "checkpoint",
        ] {
            assert_eq!(Tile::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn the_right_edge_matches_the_spec_example() {
        // C2SP: a tree of 70,000 is 273 full level-0 tiles and a partial of
        // width 112, a full level-1 tile and a partial of 17, and a partial
        // level-2 tile of 1.
        let (full, partial) = edge(Kind::Hashes(0), 70_000);
        assert_eq!(full.unwrap().index, 272);
        assert_eq!(partial.unwrap().width, 112);
        assert_eq!(partial.unwrap().index, 273);
        let (full, partial) = edge(Kind::Hashes(1), 70_000);
        assert_eq!(full.unwrap().index, 0);
        assert_eq!(partial.unwrap().width, 17);
        let (full, partial) = edge(Kind::Hashes(2), 70_000);
        assert_eq!((full, partial.unwrap().width), (None, 1));
        assert_eq!(levels(70_000), 3);
        // A tree of 256: a full level-0 tile and a partial level-1 tile of 1.
        assert_eq!(edge(Kind::Hashes(0), 256).1, None);
        assert_eq!(edge(Kind::Hashes(1), 256).1.unwrap().width, 1);
        assert_eq!(levels(0), 0);
    }

    #[test]
    fn nodes_from_tiles_equal_the_merkle_nodes() {
        let leaves: Vec<Hash> = (0..600u32).map(|i| leaf_hash(&i.to_be_bytes())).collect();
        let level1: Vec<Hash> = leaves
            .chunks_exact(256)
            .map(|c| subtree_of(c).unwrap())
            .collect();
        for (level, index) in [(0, 5), (3, 7), (7, 1), (8, 0), (8, 1), (9, 0)] {
            let at = node_at(level, index);
            let tile: &[Hash] = if at.tile_level == 0 {
                &leaves[(at.tile * WIDTH) as usize..]
            } else {
                &level1[..]
            };
            let got = subtree_of(&tile[at.offset..at.offset + at.count]).unwrap();
            let want = subtree_root(index << level, (index + 1) << level, &mut |l, i| {
                Ok::<_, TileError>(root(&leaves[(i << l) as usize..((i + 1) << l) as usize]))
            })
            .unwrap();
            assert_eq!(got, want, "node {level}/{index}");
        }
        assert!(subtree_of(&leaves[..3]).is_err());
    }

    #[test]
    fn bundles_round_trip_and_bad_ones_are_refused() {
        let mut bundle = Vec::new();
        push_entry(&mut bundle, b"one").unwrap();
        push_entry(&mut bundle, b"").unwrap();
        push_entry(&mut bundle, &[7; 300]).unwrap();
        assert_eq!(&bundle[..5], &[0, 3, b'o', b'n', b'e']);
        let entries = bundle_entries(&bundle).unwrap();
        assert_eq!(entries, vec![&b"one"[..], &b""[..], &[7; 300][..]]);
        assert_eq!(
            push_entry(&mut bundle, &vec![0; MAX_ENTRY_BYTES + 1]),
            Err(BundleError::TooLarge(MAX_ENTRY_BYTES + 1))
        );
        push_entry(&mut Vec::new(), &vec![0; MAX_ENTRY_BYTES]).unwrap();
        assert!(matches!(
            bundle_entries(&bundle[..bundle.len() - 1]),
            Err(BundleError::Truncated { entry: 2, .. })
        ));
        assert!(bundle_entries(&[0]).is_err());
    }
}
