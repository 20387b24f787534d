//! The KV cache's bookkeeping: which fixed-size block of the cache holds
//! which sequence's keys and values, and which full blocks hold a known
//! token prefix so that a later sequence can reuse them (prefix caching).
//! Plain Rust, no tensors: the tensors live in `model::KvPool`, indexed by
//! the block ids handed out here.
//!
//! A block is in exactly one of three states:
//! - **in use**: referenced by one or more sequences' `BlockTable`s
//!   (shared prefix blocks have several references);
//! - **cached**: no references, but it is full and its content hash is
//!   known, so a new sequence with the same prefix can take it back; it is
//!   evicted (least recently released first) when free blocks run out;
//! - **free**: no references and no known content.
//!
//! A full block's hash chains its parent's hash with its own tokens, so a
//! hash names a whole prefix, not a block's tokens alone. The tokens are
//! kept beside the hash and compared on a hit: a hash collision can never
//! hand one patient's cached context to another request.
//!
//! Blocks are cached per namespace: keys and values computed with one LoRA
//! adapter differ from the base model's for the same tokens, so each adapter
//! served on the engine has its own namespace (0 is the base model).

use std::collections::{BTreeMap, HashMap};
use std::hash::{DefaultHasher, Hash, Hasher};

/// The blocks one sequence uses, in order: block `i` holds positions
/// `i * block_size .. (i + 1) * block_size`.
#[derive(Debug, Default)]
pub(crate) struct BlockTable {
    pub(crate) blocks: Vec<u32>,
    /// How many leading blocks are full and registered for prefix reuse.
    registered: usize,
    /// The hash of the last registered block (the chain's parent).
    parent_hash: Option<u64>,
    /// Whose keys and values the blocks hold (the adapter; 0: none).
    namespace: u64,
}

struct CachedContent {
    hash: u64,
    namespace: u64,
    tokens: Vec<u32>,
}

/// Hands out KV cache blocks and remembers full blocks by content.
pub(crate) struct BlockAllocator {
    block_size: usize,
    /// Blocks with no references and no known content.
    free: Vec<u32>,
    references: Vec<u32>,
    /// The content of full, registered blocks.
    content: Vec<Option<CachedContent>>,
    /// Prefix hash → the block holding it.
    by_hash: HashMap<u64, u32>,
    /// Unreferenced registered blocks, by release time (oldest first).
    evictable: BTreeMap<u64, u32>,
    /// Each block's key in `evictable`, while it is there.
    released_at: Vec<Option<u64>>,
    clock: u64,
}

impl BlockAllocator {
    pub(crate) fn new(num_blocks: usize, block_size: usize) -> Self {
        BlockAllocator {
            block_size,
            // Popped from the end: lower ids first.
            free: (0..num_blocks as u32).rev().collect(),
            references: vec![0; num_blocks],
            content: (0..num_blocks).map(|_| None).collect(),
            by_hash: HashMap::new(),
            evictable: BTreeMap::new(),
            released_at: vec![None; num_blocks],
            clock: 0,
        }
    }

    /// Blocks that could be handed out now (free, or cached and evictable).
    pub(crate) fn available(&self) -> usize {
        self.free.len() + self.evictable.len()
    }

    /// Blocks needed to hold `tokens` positions.
    pub(crate) fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.block_size)
    }

    /// Finds the longest run of cached full blocks of `namespace` holding a
    /// prefix of `tokens[..limit]` and gives them to a new table (with a
    /// reference each). Returns the table and the number of tokens it
    /// already holds.
    pub(crate) fn match_prefix(
        &mut self,
        tokens: &[u32],
        limit: usize,
        namespace: u64,
    ) -> (BlockTable, usize) {
        let mut table = BlockTable {
            namespace,
            ..BlockTable::default()
        };
        let limit = limit.min(tokens.len());
        for chunk in tokens[..limit].chunks_exact(self.block_size) {
            let hash = chain_hash(namespace, table.parent_hash, chunk);
            let Some(&block) = self.by_hash.get(&hash) else {
                break;
            };
            let same = self.content[block as usize]
                .as_ref()
                .is_some_and(|content| {
                    content.hash == hash
                        && content.namespace == namespace
                        && content.tokens == chunk
                });
            if !same {
                break;
            }
            self.take_reference(block);
            table.blocks.push(block);
            table.registered += 1;
            table.parent_hash = Some(hash);
        }
        let cached = table.blocks.len() * self.block_size;
        (table, cached)
    }

    /// Grows `table` to hold `positions` tokens. False (and nothing
    /// changed) when there are not enough blocks.
    pub(crate) fn grow(&mut self, table: &mut BlockTable, positions: usize) -> bool {
        let needed = self
            .blocks_for(positions)
            .saturating_sub(table.blocks.len());
        if needed > self.available() {
            return false;
        }
        for _ in 0..needed {
            let block = match self.free.pop() {
                Some(block) => block,
                None => self.evict_oldest(),
            };
            self.references[block as usize] = 1;
            table.blocks.push(block);
        }
        true
    }

    /// Records the blocks of `table` that `computed` tokens of `tokens`
    /// fill completely, so later sequences can reuse them.
    pub(crate) fn register_full_blocks(
        &mut self,
        table: &mut BlockTable,
        tokens: &[u32],
        computed: usize,
    ) {
        let full = (computed.min(tokens.len()) / self.block_size).min(table.blocks.len());
        while table.registered < full {
            let index = table.registered;
            let chunk = &tokens[index * self.block_size..(index + 1) * self.block_size];
            let hash = chain_hash(table.namespace, table.parent_hash, chunk);
            let block = table.blocks[index];
            // Another block may already hold this prefix (two sequences
            // computed it at once); then this one stays anonymous.
            if let std::collections::hash_map::Entry::Vacant(entry) = self.by_hash.entry(hash) {
                entry.insert(block);
                self.content[block as usize] = Some(CachedContent {
                    hash,
                    namespace: table.namespace,
                    tokens: chunk.to_vec(),
                });
            }
            table.parent_hash = Some(hash);
            table.registered += 1;
        }
    }

    /// Drops the table's references. Registered blocks stay cached until
    /// their room is needed; the others are free at once.
    pub(crate) fn release(&mut self, table: &mut BlockTable) {
        for block in table.blocks.drain(..) {
            let references = &mut self.references[block as usize];
            *references = references.saturating_sub(1);
            if *references > 0 {
                continue;
            }
            if self.content[block as usize].is_some() {
                self.clock += 1;
                self.evictable.insert(self.clock, block);
                self.released_at[block as usize] = Some(self.clock);
            } else {
                self.free.push(block);
            }
        }
        table.registered = 0;
        table.parent_hash = None;
    }

    fn take_reference(&mut self, block: u32) {
        if let Some(released) = self.released_at[block as usize].take() {
            self.evictable.remove(&released);
        }
        self.references[block as usize] += 1;
    }

    fn evict_oldest(&mut self) -> u32 {
        let Some((_, block)) = self.evictable.pop_first() else {
            unreachable!("grow checked that a block is available");
        };
        self.released_at[block as usize] = None;
        if let Some(content) = self.content[block as usize].take() {
            self.by_hash.remove(&content.hash);
        }
        block
    }
}

fn chain_hash(namespace: u64, parent: Option<u64>, tokens: &[u32]) -> u64 {
    // DefaultHasher::new() uses fixed keys: the same prefix always hashes
    // the same within a process, which is all the cache needs.
    let mut hasher = DefaultHasher::new();
    namespace.hash(&mut hasher);
    parent.hash(&mut hasher);
    tokens.hash(&mut hasher);
    hasher.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens(count: u32) -> Vec<u32> {
        (100..100 + count).collect()
    }

    #[test]
    fn grows_by_whole_blocks_and_refuses_past_the_budget() {
        let mut allocator = BlockAllocator::new(4, 16);
        let mut table = BlockTable::default();
        assert!(allocator.grow(&mut table, 17));
        assert_eq!(table.blocks.len(), 2);
        assert!(allocator.grow(&mut table, 32), "still two blocks");
        assert_eq!(table.blocks.len(), 2);
        let mut other = BlockTable::default();
        assert!(!allocator.grow(&mut other, 48), "three more do not fit");
        assert!(other.blocks.is_empty());
        assert!(allocator.grow(&mut other, 32));
        assert_eq!(allocator.available(), 0);
        allocator.release(&mut table);
        assert_eq!(allocator.available(), 2);
    }

    #[test]
    fn a_registered_prefix_is_found_again_after_release() {
        let mut allocator = BlockAllocator::new(8, 4);
        let prompt = tokens(10);
        let mut first = BlockTable::default();
        assert!(allocator.grow(&mut first, prompt.len()));
        allocator.register_full_blocks(&mut first, &prompt, prompt.len());
        let first_blocks = first.blocks.clone();
        allocator.release(&mut first);

        let mut longer = prompt.clone();
        longer.extend([7, 7, 7]);
        let (table, cached) = allocator.match_prefix(&longer, longer.len() - 1, 0);
        assert_eq!(cached, 8, "two full blocks of four");
        assert_eq!(table.blocks, first_blocks[..2]);
    }

    #[test]
    fn the_limit_keeps_the_last_token_to_compute() {
        let mut allocator = BlockAllocator::new(8, 4);
        let prompt = tokens(8);
        let mut first = BlockTable::default();
        assert!(allocator.grow(&mut first, 8));
        allocator.register_full_blocks(&mut first, &prompt, 8);
        let (_table, cached) = allocator.match_prefix(&prompt, prompt.len() - 1, 0);
        assert_eq!(cached, 4, "the second block would leave nothing to compute");
    }

    #[test]
    fn a_different_earlier_block_breaks_the_chain() {
        let mut allocator = BlockAllocator::new(8, 4);
        let prompt = tokens(8);
        let mut first = BlockTable::default();
        assert!(allocator.grow(&mut first, 8));
        allocator.register_full_blocks(&mut first, &prompt, 8);
        let mut changed = prompt.clone();
        changed[0] = 1;
        let (table, cached) = allocator.match_prefix(&changed, 8, 0);
        assert_eq!((table.blocks.len(), cached), (0, 0));
    }

    #[test]
    fn blocks_are_reused_only_within_their_namespace() {
        let mut allocator = BlockAllocator::new(8, 4);
        let prompt = tokens(8);
        let (mut adapted, cached) = allocator.match_prefix(&prompt, 8, 7);
        assert_eq!(cached, 0);
        assert!(allocator.grow(&mut adapted, 8));
        allocator.register_full_blocks(&mut adapted, &prompt, 8);
        allocator.release(&mut adapted);
        assert_eq!(allocator.match_prefix(&prompt, 8, 0).1, 0, "the base model");
        assert_eq!(
            allocator.match_prefix(&prompt, 8, 3).1,
            0,
            "another adapter"
        );
        assert_eq!(
            allocator.match_prefix(&prompt, 8, 7).1,
            8,
            "the same adapter"
        );
    }

    #[test]
    fn shared_blocks_are_referenced_not_copied_and_outlive_one_owner() {
        let mut allocator = BlockAllocator::new(4, 4);
        let prompt = tokens(8);
        let mut first = BlockTable::default();
        assert!(allocator.grow(&mut first, 8));
        allocator.register_full_blocks(&mut first, &prompt, 8);
        let (mut second, cached) = allocator.match_prefix(&prompt, 8, 0);
        assert_eq!(cached, 8);
        assert_eq!(
            allocator.available(),
            2,
            "shared blocks are not counted twice"
        );
        allocator.release(&mut first);
        assert_eq!(allocator.available(), 2, "still held by the second");
        allocator.release(&mut second);
        assert_eq!(allocator.available(), 4);
    }

    #[test]
    fn cached_blocks_are_evicted_oldest_first_when_room_runs_out() {
        let mut allocator = BlockAllocator::new(2, 4);
        let (a, b) = (tokens(4), vec![9; 4]);
        for prompt in [&a, &b] {
            let mut table = BlockTable::default();
            assert!(allocator.grow(&mut table, 4));
            allocator.register_full_blocks(&mut table, prompt, 4);
            allocator.release(&mut table);
        }
        let mut table = BlockTable::default();
        assert!(allocator.grow(&mut table, 4), "evicts a's block");
        assert_eq!(allocator.match_prefix(&a, 4, 0).1, 0);
        let (mut hit, cached) = allocator.match_prefix(&b, 4, 0);
        assert_eq!(cached, 4, "b's block survived");
        allocator.release(&mut hit);
        allocator.release(&mut table);
    }
}
