//! Extent tree nodes: a 12-byte header followed by 12-byte entries, either
//! leaf extents (depth 0) or index entries (depth > 0). Tree blocks end with
//! a 4-byte crc32c tail when metadata_csum is on.

use super::{get16, get32, put16, put32};
use crate::csum::crc32c_raw;

pub const MAGIC: u16 = 0xF30A;
pub const HEADER_LEN: usize = 12;
pub const ENTRY_LEN: usize = 12;
/// Longest initialised extent, in blocks.
pub const MAX_INIT_LEN: u32 = 32768;
/// Longest unwritten extent, in blocks.
pub const MAX_UNWRITTEN_LEN: u32 = 32767;
/// Deepest tree ext4 allows.
pub const MAX_DEPTH: u16 = 5;

/// A leaf extent: `len` blocks from logical `lblk` at physical `pblk`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    pub lblk: u32,
    pub len: u32,
    pub pblk: u64,
    pub unwritten: bool,
}

impl Extent {
    pub fn end(&self) -> u64 {
        u64::from(self.lblk) + u64::from(self.len)
    }
}

/// An index entry: the subtree at `child` covers logical blocks from `lblk`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Index {
    pub lblk: u32,
    pub child: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub entries: u16,
    pub max: u16,
    pub depth: u16,
}

/// A parsed node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Node {
    Leaf(Vec<Extent>),
    Index { depth: u16, entries: Vec<Index> },
}

/// Why a node failed to parse (the caller adds where it came from).
#[derive(Debug, PartialEq, Eq)]
pub enum NodeError {
    BadMagic,
    BadHeader(&'static str),
    Truncated,
}

impl NodeError {
    pub fn describe(&self) -> &'static str {
        match self {
            NodeError::BadMagic => "extent header has a bad magic number",
            NodeError::BadHeader(s) => s,
            NodeError::Truncated => "extent node is truncated",
        }
    }
}

/// Parse a node from `b` (60 bytes of i_block, or a whole tree block).
/// `max_capacity` is how many entries fit in `b`.
pub fn parse_node(b: &[u8]) -> Result<(Header, Node), NodeError> {
    let magic = get16(b, 0).ok_or(NodeError::Truncated)?;
    if magic != MAGIC {
        return Err(NodeError::BadMagic);
    }
    let h = Header {
        entries: get16(b, 2).ok_or(NodeError::Truncated)?,
        max: get16(b, 4).ok_or(NodeError::Truncated)?,
        depth: get16(b, 6).ok_or(NodeError::Truncated)?,
    };
    let capacity = (b.len().saturating_sub(HEADER_LEN)) / ENTRY_LEN;
    if usize::from(h.max) > capacity {
        return Err(NodeError::BadHeader(
            "extent header eh_max exceeds the node size",
        ));
    }
    if h.entries > h.max {
        return Err(NodeError::BadHeader(
            "extent header has more entries than eh_max",
        ));
    }
    if h.depth > MAX_DEPTH {
        return Err(NodeError::BadHeader(
            "extent tree is deeper than ext4 allows",
        ));
    }
    let mut out_leaf = Vec::new();
    let mut out_idx = Vec::new();
    for i in 0..usize::from(h.entries) {
        let o = HEADER_LEN + i * ENTRY_LEN;
        let first = get32(b, o).ok_or(NodeError::Truncated)?;
        if h.depth == 0 {
            let raw_len = u32::from(get16(b, o + 4).ok_or(NodeError::Truncated)?);
            let hi = u64::from(get16(b, o + 6).ok_or(NodeError::Truncated)?);
            let lo = u64::from(get32(b, o + 8).ok_or(NodeError::Truncated)?);
            let (len, unwritten) = if raw_len > MAX_INIT_LEN {
                (raw_len - MAX_INIT_LEN, true)
            } else {
                (raw_len, false)
            };
            if len == 0 {
                return Err(NodeError::BadHeader("extent of length zero"));
            }
            out_leaf.push(Extent {
                lblk: first,
                len,
                pblk: hi << 32 | lo,
                unwritten,
            });
        } else {
            let lo = u64::from(get32(b, o + 4).ok_or(NodeError::Truncated)?);
            let hi = u64::from(get16(b, o + 8).ok_or(NodeError::Truncated)?);
            out_idx.push(Index {
                lblk: first,
                child: hi << 32 | lo,
            });
        }
    }
    let node = if h.depth == 0 {
        Node::Leaf(out_leaf)
    } else {
        Node::Index {
            depth: h.depth,
            entries: out_idx,
        }
    };
    Ok((h, node))
}

/// Serialise a node into `b` (zeroing the rest); `max` is eh_max.
pub fn write_node(b: &mut [u8], max: u16, node: &Node) {
    b.fill(0);
    put16(b, 0, MAGIC);
    put16(b, 4, max);
    match node {
        Node::Leaf(ext) => {
            assert!(ext.len() <= usize::from(max));
            put16(b, 2, ext.len() as u16);
            put16(b, 6, 0);
            for (i, e) in ext.iter().enumerate() {
                let o = HEADER_LEN + i * ENTRY_LEN;
                let raw_len = if e.unwritten {
                    assert!(e.len <= MAX_UNWRITTEN_LEN);
                    e.len + MAX_INIT_LEN
                } else {
                    assert!(e.len <= MAX_INIT_LEN && e.len > 0);
                    e.len
                };
                put32(b, o, e.lblk);
                put16(b, o + 4, raw_len as u16);
                put16(b, o + 6, (e.pblk >> 32) as u16);
                put32(b, o + 8, e.pblk as u32);
            }
        }
        Node::Index { depth, entries } => {
            assert!(entries.len() <= usize::from(max));
            put16(b, 2, entries.len() as u16);
            put16(b, 6, *depth);
            for (i, e) in entries.iter().enumerate() {
                let o = HEADER_LEN + i * ENTRY_LEN;
                put32(b, o, e.lblk);
                put32(b, o + 4, e.child as u32);
                put16(b, o + 8, (e.child >> 32) as u16);
            }
        }
    }
}

/// Entries that fit in a tree block of `block_size` bytes.
pub fn block_capacity(block_size: usize) -> u16 {
    ((block_size - HEADER_LEN) / ENTRY_LEN) as u16
}

/// Offset of the checksum tail in a tree block with eh_max `max`.
pub fn tail_offset(max: u16) -> usize {
    HEADER_LEN + usize::from(max) * ENTRY_LEN
}

/// The tree block checksum (inode csum seed over the block up to the tail).
pub fn block_csum(inode_seed: u32, block: &[u8], max: u16) -> Option<u32> {
    let t = tail_offset(max);
    Some(crc32c_raw(inode_seed, block.get(..t)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leaf_and_index_round_trip() {
        let leaf = Node::Leaf(vec![
            Extent {
                lblk: 0,
                len: 10,
                pblk: 1 << 40,
                unwritten: false,
            },
            Extent {
                lblk: 100,
                len: 32767,
                pblk: 5,
                unwritten: true,
            },
            Extent {
                lblk: 200_000,
                len: 32768,
                pblk: 99,
                unwritten: false,
            },
        ]);
        let mut b = vec![0u8; 60];
        write_node(&mut b, 4, &leaf);
        let (h, n) = parse_node(&b).unwrap();
        assert_eq!(h.entries, 3);
        assert_eq!(n, leaf);
        let idx = Node::Index {
            depth: 2,
            entries: vec![Index {
                lblk: 7,
                child: (1 << 33) + 5,
            }],
        };
        let mut b = vec![0u8; 4096];
        write_node(&mut b, block_capacity(4096), &idx);
        assert_eq!(parse_node(&b).unwrap().1, idx);
    }

    #[test]
    fn hostile_headers_are_errors() {
        let mut b = vec![0u8; 60];
        assert_eq!(parse_node(&b).unwrap_err(), NodeError::BadMagic);
        put16(&mut b, 0, MAGIC);
        put16(&mut b, 4, 400);
        assert!(parse_node(&b).is_err());
        put16(&mut b, 4, 4);
        put16(&mut b, 2, 5);
        assert!(parse_node(&b).is_err());
        assert!(parse_node(&b[..5]).is_err());
    }
}
