//! Layer streaming: when a model's weights do not fit the memory budget, the
//! blocks that do not fit stay in host memory and take turns in GPU slots.
//!
//! Blocks of the same tensor layout (shapes and storage types) share two
//! slots, alternating. A planned graph that binds a streamed weight is run
//! in segments, one per block: before each segment's submission the block's
//! bytes are written into its slot (`Queue::write_buffer`, ordered after
//! every earlier submission and before the segment), so results are the
//! same bits as with every block resident. At most two segments are in
//! flight: the host copies the next block into wgpu's staging memory while
//! the GPU runs the current one, and waits before a third, which bounds the
//! staging memory to about two blocks. (wgpu has one queue: on the GPU the
//! copy itself runs between the segments, not beside them.) A stream is
//! used by one run at a time ([`BlockStream::lock_runs`]).

use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::error::{Error, Result};
use crate::gpu::{Gpu, TrackedBuffer};
use crate::tensor::Tensor;

/// A streamed weight's place: its stream and block.
#[derive(Clone)]
pub struct StreamRef {
    /// The stream holding the block's bytes.
    pub stream: Arc<BlockStream>,
    /// The block's index in the model.
    pub block: usize,
}

impl std::fmt::Debug for StreamRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "StreamRef(block {})", self.block)
    }
}

/// Uploads done by a stream (counters since the last [`BlockStream::take_stats`]).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct UploadStats {
    /// Blocks written into their slots.
    pub blocks: usize,
    /// Bytes written.
    pub bytes: u64,
    /// Host time spent handing them to the queue (copies into staging), ns.
    pub host_ns: f64,
}

struct Slot {
    buffers: Vec<Arc<TrackedBuffer>>,
    resident: Option<usize>,
}

struct Streamed {
    block: usize,
    slot: usize,
    data: Vec<Vec<u8>>,
    group: usize,
}

/// The streamed blocks of one model and their GPU slots.
pub struct BlockStream {
    name: String,
    blocks: Vec<Streamed>,
    slots: Mutex<Vec<Slot>>,
    stats: Mutex<UploadStats>,
    runs: Mutex<()>,
}

impl BlockStream {
    /// Held for the whole of a run: slots are shared state, so two runs
    /// must not interleave their uploads and submissions.
    pub fn lock_runs(&self) -> std::sync::MutexGuard<'_, ()> {
        self.runs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Blocks streamed, in order.
    pub fn blocks(&self) -> Vec<usize> {
        self.blocks.iter().map(|b| b.block).collect()
    }

    /// GPU bytes of the slots.
    pub fn slot_bytes(&self) -> u64 {
        let slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        slots
            .iter()
            .flat_map(|s| s.buffers.iter().map(|b| b.size()))
            .sum()
    }

    /// Host bytes held for the streamed blocks.
    pub fn host_bytes(&self) -> u64 {
        self.blocks
            .iter()
            .flat_map(|b| b.data.iter().map(|d| d.len() as u64))
            .sum()
    }

    /// Makes `block`'s weights the contents of its slot, writing them there
    /// unless they already are.
    pub fn ensure(&self, gpu: &Gpu, block: usize) -> Result<()> {
        let b = self
            .blocks
            .iter()
            .find(|b| b.block == block)
            .ok_or_else(|| Error::Graph(format!("{}: block {block} is not streamed", self.name)))?;
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        let slot = slots
            .get_mut(b.slot)
            .ok_or_else(|| Error::Graph(format!("{}: no slot {}", self.name, b.slot)))?;
        if slot.resident == Some(block) {
            return Ok(());
        }
        let t0 = Instant::now();
        let mut bytes = 0;
        // Unknown contents until every tensor is written: a write that fails
        // half-way must not leave the slot taken for its old block.
        slot.resident = None;
        for (buf, data) in slot.buffers.iter().zip(&b.data) {
            gpu.write_buffer("a streamed block", buf, data)?;
            bytes += data.len() as u64;
        }
        slot.resident = Some(block);
        let mut s = self.stats.lock().unwrap_or_else(|p| p.into_inner());
        s.blocks += 1;
        s.bytes += bytes;
        s.host_ns += t0.elapsed().as_nanos() as f64;
        Ok(())
    }

    /// The uploads since the last call, and resets the counters.
    pub fn take_stats(&self) -> UploadStats {
        std::mem::take(&mut *self.stats.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

/// A block's tensor layout: (storage type, bytes) of each tensor in order.
type Layout = Vec<(crate::DType, u64)>;

fn signature(tensors: &[&mut Tensor]) -> Layout {
    tensors.iter().map(|t| (t.dtype, t.buffer.size())).collect()
}

/// Fails early when even the parts outside the blocks and a run's
/// activations (`fixed`, with what the GPU holds already) exceed `budget`.
pub fn check_room(name: &str, fixed: u64, budget: u64) -> Result<()> {
    if fixed > budget {
        return Err(Error::Graph(format!(
            "{name}: a memory budget of {:.0} MiB is too small: what stays on the GPU and one run's activations already take {:.0} MiB",
            budget as f64 / MIB,
            fixed as f64 / MIB
        )));
    }
    Ok(())
}

/// Builds a [`BlockStream`] as a model's blocks are loaded.
pub struct StreamBuilder {
    name: String,
    blocks: Vec<Streamed>,
    /// (layout, slots of that layout, blocks of it so far).
    groups: Vec<(Layout, [Option<usize>; 2], usize)>,
    slots: Vec<Slot>,
}

impl StreamBuilder {
    /// An empty stream for the model `name` (used in messages).
    pub fn new(name: &str) -> StreamBuilder {
        StreamBuilder {
            name: name.to_string(),
            blocks: Vec::new(),
            groups: Vec::new(),
            slots: Vec::new(),
        }
    }

    /// Moves a loaded block to host memory: its tensors' bytes are read back
    /// and the tensors rebound to the block's slot (the first two blocks of
    /// each layout keep their own buffers as the slots; later blocks' buffers
    /// are freed).
    pub fn add(&mut self, gpu: &Gpu, block: usize, mut tensors: Vec<&mut Tensor>) -> Result<()> {
        let sig = signature(&tensors);
        let g = match self.groups.iter().position(|(s, _, _)| *s == sig) {
            Some(g) => g,
            None => {
                self.groups.push((sig, [None, None], 0));
                self.groups.len() - 1
            }
        };
        let parity = self.groups[g].2 % 2;
        self.groups[g].2 += 1;
        let mut data = Vec::with_capacity(tensors.len());
        for t in &tensors {
            data.push(gpu.read_bytes(&t.buffer, t.buffer.size())?);
        }
        let slot = match self.groups[g].1[parity] {
            Some(s) => {
                for (t, buf) in tensors.iter_mut().zip(&self.slots[s].buffers) {
                    t.buffer = buf.clone();
                }
                s
            }
            None => {
                self.slots.push(Slot {
                    buffers: tensors.iter().map(|t| t.buffer.clone()).collect(),
                    resident: Some(block),
                });
                self.groups[g].1[parity] = Some(self.slots.len() - 1);
                self.slots.len() - 1
            }
        };
        self.blocks.push(Streamed {
            block,
            slot,
            data,
            group: g,
        });
        Ok(())
    }

    /// Each added block: (index, bytes, layout group).
    pub fn sizes(&self) -> Vec<(usize, u64, usize)> {
        self.blocks
            .iter()
            .map(|b| {
                (
                    b.block,
                    b.data.iter().map(|d| d.len() as u64).sum(),
                    b.group,
                )
            })
            .collect()
    }

    /// GPU bytes of the slots so far.
    pub fn slot_bytes(&self) -> u64 {
        self.slots
            .iter()
            .flat_map(|s| s.buffers.iter().map(|b| b.size()))
            .sum()
    }

    /// Takes `block` out of the stream: its tensors get buffers of their own
    /// again, written from the bytes held for it.
    pub fn make_resident(
        &mut self,
        gpu: &Gpu,
        block: usize,
        tensors: Vec<&mut Tensor>,
    ) -> Result<()> {
        let k = self
            .blocks
            .iter()
            .position(|b| b.block == block)
            .ok_or_else(|| Error::Graph(format!("{}: block {block} is not streamed", self.name)))?;
        let b = self.blocks.remove(k);
        let slot = &mut self.slots[b.slot];
        let slot_used = self.blocks.iter().any(|o| o.slot == b.slot);
        if !slot_used && slot.resident == Some(block) {
            // The slot holds this block and serves no other: it becomes the
            // block's own memory again, nothing is copied.
            slot.buffers.clear();
            for t in tensors {
                t.stream = None;
            }
            return Ok(());
        }
        for (t, data) in tensors.into_iter().zip(&b.data) {
            let buf = crate::tensor::create_storage(gpu, "weight", data.len() as u64)?;
            gpu.write_buffer("a weight upload", &buf, data)?;
            t.buffer = Arc::new(buf);
            t.stream = None;
        }
        Ok(())
    }

    /// Frees the slots that no block in the stream uses (each stays alive
    /// only as long as a tensor still points at it).
    fn drop_unused_slots(&mut self) {
        for (i, slot) in self.slots.iter_mut().enumerate() {
            if !self.blocks.iter().any(|b| b.slot == i) {
                slot.buffers.clear();
            }
        }
    }

    /// The stream of the blocks still in it (slots that no block uses any
    /// more are freed), or `None` when none is.
    pub fn finish(mut self) -> Option<Arc<BlockStream>> {
        if self.blocks.is_empty() {
            return None;
        }
        let mut map = vec![None; self.slots.len()];
        let mut slots = Vec::new();
        for (i, slot) in self.slots.drain(..).enumerate() {
            if self.blocks.iter().any(|b| b.slot == i) {
                map[i] = Some(slots.len());
                slots.push(slot);
            }
        }
        for b in &mut self.blocks {
            b.slot = map[b.slot].unwrap_or(0);
        }
        Some(Arc::new(BlockStream {
            name: self.name,
            blocks: self.blocks,
            slots: Mutex::new(slots),
            stats: Mutex::new(UploadStats::default()),
            runs: Mutex::new(()),
        }))
    }
}

/// After a budgeted load that added every block to `builder`: keeps as many
/// leading blocks resident as `budget` = (bytes, activations) allows beside
/// everything else on the GPU, and points the rest at the finished stream.
pub fn settle<B>(
    gpu: &Gpu,
    builder: StreamBuilder,
    (bytes, activations): (u64, u64),
    blocks: &mut [B],
    tensors: impl Fn(&mut B) -> Vec<&mut Tensor>,
) -> Result<()> {
    let mut s = builder;
    let fixed = gpu.memory.current().saturating_sub(s.slot_bytes()) + activations;
    let sizes: Vec<(u64, usize)> = s.sizes().iter().map(|&(_, b, g)| (b, g)).collect();
    let (resident, _) = choose_resident(fixed, &sizes, bytes)
        .map_err(|e| Error::Graph(format!("{}: {e}", s.name)))?;
    // Slot owners whose slot no streamed block needs keep their buffers;
    // the others get new ones (after the unused slots are let go).
    let keep: Vec<usize> = (resident..blocks.len()).collect();
    let streamed_slots: Vec<usize> = s
        .blocks
        .iter()
        .filter(|b| keep.contains(&b.block))
        .map(|b| b.slot)
        .collect();
    for (i, block) in blocks.iter_mut().enumerate().take(resident) {
        let own = s.blocks.iter().find(|b| b.block == i).map(|b| b.slot);
        if own.is_some_and(|sl| !streamed_slots.contains(&sl)) {
            s.make_resident(gpu, i, tensors(block))?;
        }
    }
    s.drop_unused_slots();
    for (i, block) in blocks.iter_mut().enumerate().take(resident) {
        if s.blocks.iter().any(|b| b.block == i) {
            s.make_resident(gpu, i, tensors(block))?;
        }
    }
    if let Some(stream) = s.finish() {
        for (i, block) in blocks.iter_mut().enumerate().skip(resident) {
            tag(tensors(block), &stream, i);
        }
    }
    Ok(())
}

/// Marks `tensors` as block `block` of `stream`.
pub fn tag(tensors: Vec<&mut Tensor>, stream: &Arc<BlockStream>, block: usize) {
    for t in tensors {
        t.stream = Some(StreamRef {
            stream: stream.clone(),
            block,
        });
    }
}

/// Each block's (bytes, layout group) from its tensors' shapes and storage
/// types (what [`choose_resident`] takes; shape-only models plan with it).
pub fn block_sizes<'a>(blocks: impl Iterator<Item = Vec<&'a mut Tensor>>) -> Vec<(u64, usize)> {
    let mut layouts: Vec<Layout> = Vec::new();
    blocks
        .map(|tensors| {
            let layout: Layout = tensors
                .iter()
                .map(|t| (t.dtype, t.dtype.bytes(t.numel()).max(4)))
                .collect();
            let bytes = layout.iter().map(|l| l.1).sum();
            let g = match layouts.iter().position(|l| *l == layout) {
                Some(g) => g,
                None => {
                    layouts.push(layout);
                    layouts.len() - 1
                }
            };
            (bytes, g)
        })
        .collect()
}

/// How many of a model's blocks stay resident under a budget: the longest
/// prefix of `blocks` ((bytes, layout group) of each) such that `fixed`
/// (everything else that stays: other weights, activations) plus those
/// blocks plus the slots of the rest (two per layout group, one where a group
/// has a single streamed block) fits `budget`. Returns (resident blocks,
/// peak bytes), or an error when not even streaming every block fits.
pub fn choose_resident(fixed: u64, blocks: &[(u64, usize)], budget: u64) -> Result<(usize, u64)> {
    let peak = |r: usize| {
        let resident: u64 = blocks[..r].iter().map(|b| b.0).sum();
        let mut groups: Vec<(usize, u64, u64)> = Vec::new();
        for &(bytes, g) in &blocks[r..] {
            match groups.iter_mut().find(|x| x.0 == g) {
                Some(x) => {
                    x.1 = x.1.max(bytes);
                    x.2 += 1;
                }
                None => groups.push((g, bytes, 1)),
            }
        }
        let slots: u64 = groups.iter().map(|&(_, b, n)| b * n.min(2)).sum();
        (fixed + resident + slots, slots)
    };
    for r in (0..=blocks.len()).rev() {
        let (p, _) = peak(r);
        if p <= budget {
            return Ok((r, p));
        }
    }
    let (p, slots) = peak(0);
    Err(Error::Graph(format!(
        "a memory budget of {:.0} MiB is too small: even with every block streamed this stage needs {:.0} MiB ({:.0} MiB of activations and other weights, {:.0} MiB of block slots)",
        budget as f64 / MIB,
        p as f64 / MIB,
        fixed as f64 / MIB,
        slots as f64 / MIB
    )))
}

const MIB: f64 = (1u64 << 20) as f64;
