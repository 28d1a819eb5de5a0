//! `smoe bench`: prefill and decode a synthetic prompt (or a list of chat
//! prompts), and put the streaming counters next to what the disk can do,
//! measured in the same run with the engine's own reader.

use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

use crate::compute::profile::{KernelTimes, OpTimes};
use crate::config::ModelConfig;
use crate::engine::{rate, Engine};
use crate::error::{Error, Result};
use crate::experts::io::{AlignedBuf, DirectFile, Priority, ReadJob, ReaderPool, Segment};
use crate::experts::StatsSnapshot;
use crate::gguf::Gguf;
use crate::sampler::SamplingParams;
use crate::vault::{align_up, Vault, ALIGN};

#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub prompt_tokens: usize,
    pub gen_tokens: usize,
    pub seed: u64,
}

/// One prefill + decode run.
#[derive(Debug, Clone)]
pub struct BenchRun {
    pub prefill_tok_s: f64,
    pub decode_tok_s: f64,
    /// Prompt in, first token chosen.
    pub ttft_s: f64,
    pub prefill: StatsSnapshot,
    pub decode: StatsSnapshot,
    pub prefill_tokens: usize,
    pub decode_tokens: usize,
    pub prefill_s: f64,
    pub decode_s: f64,
    /// Time per op while prefilling and while decoding; empty unless
    /// [`crate::compute::profile::enable`] was called before the model
    /// was built.
    pub prefill_ops: OpTimes,
    pub decode_ops: OpTimes,
    /// GPU kernels while prefilling and while decoding, as for the ops.
    pub prefill_kernels: KernelTimes,
    pub decode_kernels: KernelTimes,
}

impl BenchRun {
    /// Runs one after another taken as one: counters and times summed,
    /// rates over the sums, the mean time to first token.
    fn total(runs: &[BenchRun]) -> BenchRun {
        let mut t = BenchRun {
            prefill_tok_s: 0.0,
            decode_tok_s: 0.0,
            ttft_s: 0.0,
            prefill: StatsSnapshot::default(),
            decode: StatsSnapshot::default(),
            prefill_tokens: 0,
            decode_tokens: 0,
            prefill_s: 0.0,
            decode_s: 0.0,
            prefill_ops: OpTimes::default(),
            decode_ops: OpTimes::default(),
            prefill_kernels: KernelTimes::default(),
            decode_kernels: KernelTimes::default(),
        };
        for r in runs {
            t.prefill += r.prefill;
            t.decode += r.decode;
            t.prefill_tokens += r.prefill_tokens;
            t.decode_tokens += r.decode_tokens;
            t.prefill_s += r.prefill_s;
            t.decode_s += r.decode_s;
            t.prefill_ops.add(&r.prefill_ops);
            t.decode_ops.add(&r.decode_ops);
            t.prefill_kernels.add(&r.prefill_kernels);
            t.decode_kernels.add(&r.decode_kernels);
            t.ttft_s += r.ttft_s / runs.len() as f64;
        }
        t.prefill_tok_s = rate(t.prefill_tokens, t.prefill_s);
        t.decode_tok_s = rate(t.decode_tokens, t.decode_s);
        t
    }
}

/// Prompt ids drawn from the tokenizer's ordinary tokens (or the vocab),
/// seeded, so every run and every engine sees the same prompt.
pub fn prompt(engine: &Engine, n: usize, seed: u64) -> Vec<u32> {
    let vocab = engine.model.config().vocab_size as u64;
    let limit = engine
        .tokenizer
        .as_ref()
        .map_or(vocab, |t| (t.max_id() as u64 + 1).min(vocab));
    // Stay clear of the added/special tokens at the top of the range.
    let limit = (limit * 9 / 10).max(1);
    let mut x = seed ^ 0x9E37_79B9_7F4A_7C15;
    (0..n)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((x >> 33) % limit) as u32
        })
        .collect()
}

/// Prefills `prompt_tokens` and decodes `gen_tokens` greedily, ignoring
/// end-of-sequence so every run decodes the same number of tokens.
pub fn run(engine: &mut Engine, opts: &BenchOptions) -> Result<BenchRun> {
    let ids = prompt(engine, opts.prompt_tokens, opts.seed);
    let eos = std::mem::take(&mut engine.eos_ids);
    let result = measure(engine, &ids, opts.gen_tokens);
    engine.eos_ids = eos;
    result
}

/// Chat prompts one after another through one engine, as a server would
/// see them: each reply runs greedily to its end-of-turn token (or
/// `max_tokens`), the expert cache stays warm from prompt to prompt, and
/// the counters are summed over all of them.
pub fn run_prompts(engine: &Engine, prompts: &[Vec<u32>], max_tokens: usize) -> Result<BenchRun> {
    let runs = prompts
        .iter()
        .map(|ids| measure(engine, ids, max_tokens))
        .collect::<Result<Vec<_>>>()?;
    Ok(BenchRun::total(&runs))
}

fn measure(engine: &Engine, ids: &[u32], gen_tokens: usize) -> Result<BenchRun> {
    let snap = || {
        engine
            .cache
            .as_ref()
            .map(|c| c.stats().snapshot())
            .unwrap_or_default()
    };
    let mut session = engine.new_session();
    let before = snap();
    let ops_before = OpTimes::now();
    let kernels_before = KernelTimes::now();
    let mut first = None;
    let start = Instant::now();
    let mut at_first = StatsSnapshot::default();
    let mut ops_at_first = ops_before;
    let mut kernels_at_first = kernels_before.clone();
    let gen = engine.generate(
        &mut session,
        ids,
        &SamplingParams::default(),
        gen_tokens,
        |_| {
            if first.is_none() {
                first = Some(start.elapsed().as_secs_f64());
                at_first = snap();
                ops_at_first = OpTimes::now();
                kernels_at_first = KernelTimes::now();
            }
        },
    )?;
    let end = snap();
    let ops_end = OpTimes::now();
    let kernels_end = KernelTimes::now();
    Ok(BenchRun {
        prefill_tok_s: gen.timings.prefill_tok_s(),
        decode_tok_s: gen.timings.decode_tok_s(),
        ttft_s: first.unwrap_or(gen.timings.prefill_s),
        prefill: at_first.since(&before),
        decode: end.since(&at_first),
        prefill_tokens: gen.timings.prefill_tokens,
        decode_tokens: gen.timings.decode_tokens,
        prefill_s: gen.timings.prefill_s,
        decode_s: gen.timings.decode_s,
        prefill_ops: ops_at_first.since(&ops_before),
        decode_ops: ops_end.since(&ops_at_first),
        prefill_kernels: kernels_at_first.since(&kernels_before),
        decode_kernels: kernels_end.since(&kernels_at_first),
    })
}

/// Direct-read bandwidth of the vault's experts file with the engine's
/// reader pool at `threads` queue depth: up to `max_bytes` of records,
/// spread over the file, each read once.
pub fn read_bandwidth(vault: &Vault, threads: usize, max_bytes: u64) -> Result<(f64, bool)> {
    let file = Arc::new(DirectFile::open(&vault.experts_path())?);
    let records: Vec<(u64, usize)> = vault
        .manifest
        .experts
        .iter()
        .flat_map(|l| l.offsets.iter().map(move |&o| (o, l.record_len as usize)))
        .collect();
    sample_bandwidth(file, records, threads, max_bytes)
}

/// [`read_bandwidth`] of a GGUF's first shard: its experts' parts there,
/// each rounded out to 4 KiB as the expert cache reads them.
pub fn read_bandwidth_gguf(
    g: &Gguf,
    cfg: &ModelConfig,
    threads: usize,
    max_bytes: u64,
) -> Result<(f64, bool)> {
    let file = Arc::new(DirectFile::open(g.path())?);
    let mut records = Vec::new();
    for l in crate::gguf::expert_tensors(g, cfg)? {
        for e in 0..l.experts as u64 {
            for p in l.parts.iter().filter(|p| p.shard == 0) {
                let at = p.offset + e * p.len;
                let first = at / ALIGN * ALIGN;
                records.push((first, (align_up(at + p.len) - first) as usize));
            }
        }
    }
    sample_bandwidth(file, records, threads, max_bytes)
}

/// Reads up to `max_bytes` of `records`, spread over the file.
fn sample_bandwidth(
    file: Arc<DirectFile>,
    mut records: Vec<(u64, usize)>,
    threads: usize,
    max_bytes: u64,
) -> Result<(f64, bool)> {
    if records.is_empty() {
        return Err(Error::format(&file.path, "holds no expert records"));
    }
    let len = records.iter().map(|r| r.1).max().unwrap_or(0);
    // Spread the sample over the whole file so no read ahead helps.
    let want = ((max_bytes / len as u64) as usize).clamp(1, records.len());
    let step = records.len() / want;
    records = records
        .into_iter()
        .step_by(step.max(1))
        .take(want)
        .collect();
    read_records(file, &records, threads)
}

/// Reads `records` (offset, length) of `file` once each through the
/// engine's reader pool at `threads` queue depth: GB/s, and whether the
/// reads were direct.
pub fn read_records(
    file: Arc<DirectFile>,
    records: &[(u64, usize)],
    threads: usize,
) -> Result<(f64, bool)> {
    let len = records.iter().map(|r| r.1).max().unwrap_or(0);
    let secs = RecordReader::new(threads, len).read(&file, records)?;
    let bytes: usize = records.iter().map(|r| r.1).sum();
    Ok((bytes as f64 / secs / 1e9, file.direct))
}

/// The engine's reader pool and buffers for `depth` records in flight, kept
/// from one timed batch to the next. The buffers are written once before
/// any read: the first direct read into a fresh page faults it in and zeroes
/// it, which the engine's warm cache slots never pay and which added a
/// tenth to a batch of 2.5 MiB records.
pub struct RecordReader {
    pool: ReaderPool,
    buf: Arc<AlignedBuf>,
    depth: usize,
    len: usize,
}

impl RecordReader {
    pub fn new(depth: usize, len: usize) -> Self {
        let depth = depth.max(1);
        let buf = AlignedBuf::new(depth * len);
        // SAFETY: no other reference to the buffer exists yet.
        unsafe { buf.slice_mut(0, buf.len()) }.fill(1);
        Self {
            pool: ReaderPool::new(depth),
            buf: Arc::new(buf),
            depth,
            len,
        }
    }

    /// Seconds to read `records` (none longer than the reader's `len`),
    /// `depth` at a time.
    pub fn read(&self, file: &Arc<DirectFile>, records: &[(u64, usize)]) -> Result<f64> {
        assert!(
            records.iter().all(|r| r.1 <= self.len),
            "a record longer than the reader's buffers"
        );
        let depth = self.depth;
        let done = Arc::new((Mutex::new((0usize, None::<String>)), Condvar::new()));
        let start = Instant::now();
        for (i, &(offset, rlen)) in records.iter().enumerate() {
            // Reuse a buffer slot only after its previous read finished.
            wait_until(&done, i.saturating_sub(depth - 1));
            let d = Arc::clone(&done);
            self.pool.submit(ReadJob {
                reads: smallvec::smallvec![Segment {
                    file: Arc::clone(file),
                    offset,
                    dst_start: (i % depth) * self.len,
                    len: rlen,
                    need: rlen,
                }],
                dst: Arc::clone(&self.buf),
                priority: Priority::Demand,
                key: (0, i as u32),
                done: Box::new(move |r, _| {
                    let (lock, cv) = &*d;
                    let mut g = lock.lock().unwrap_or_else(|e| e.into_inner());
                    g.0 += 1;
                    if let Err(e) = r {
                        g.1.get_or_insert(e.to_string());
                    }
                    cv.notify_all();
                }),
            });
        }
        if let Some(e) = wait_until(&done, records.len()) {
            return Err(Error::format(
                &file.path,
                format!("measuring read bandwidth: {e}"),
            ));
        }
        Ok(start.elapsed().as_secs_f64())
    }
}

type Done = (Mutex<(usize, Option<String>)>, Condvar);

fn wait_until(done: &Done, n: usize) -> Option<String> {
    let (lock, cv) = done;
    let mut g = lock.lock().unwrap_or_else(|e| e.into_inner());
    while g.0 < n {
        g = cv.wait(g).unwrap_or_else(|e| e.into_inner());
    }
    g.1.clone()
}
