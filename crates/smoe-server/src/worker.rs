//! One engine, many clients: requests wait in a bounded queue, and a single
//! engine thread runs up to `parallel` of them at once as one batch
//! ([`smoe::batch::Batch`]): each decode step takes a token from every
//! running request (and the next prompt chunk of one that just joined), and
//! requests join and leave between steps. Each running request has a slot
//! of its own, a session whose cache the next request extending that
//! conversation reuses, so it prefills only its new tokens. Each job streams
//! its text back over its own channel; a client that went away closes that
//! channel, and its generation stops before the next step.

use std::ops::ControlFlow;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use smoe::batch::{Batch, Finished, Request};
use smoe::engine::{Engine, StopReason, TextStream, Timings};
use smoe::sampler::SamplingParams;
use tokio::sync::mpsc;

use crate::metrics::TokenClock;
use crate::reply::StopStrings;

/// A request ready for the engine: validated, rendered and tokenized.
#[derive(Debug)]
pub struct Job {
    pub prompt: Vec<u32>,
    pub params: SamplingParams,
    pub max_tokens: usize,
    pub stop: Vec<String>,
    pub events: mpsc::UnboundedSender<Event>,
    pub clock: TokenClock,
}

/// What the engine sends back for a job, in order: text pieces, then one
/// `Done` or `Failed`.
#[derive(Debug)]
pub enum Event {
    Text(String),
    Done(Outcome),
    Failed(String),
}

#[derive(Debug, Clone, PartialEq)]
pub enum Finish {
    /// The model ended its reply.
    Eos,
    /// `max_tokens` or the context ran out.
    Length,
    /// One of the request's stop strings appeared (it is not in the text).
    Stop(String),
}

#[derive(Debug, Clone)]
pub struct Outcome {
    pub finish: Finish,
    pub prompt_tokens: usize,
    /// Prompt tokens whose KV was kept from the previous request.
    pub cached_tokens: usize,
    pub completion_tokens: usize,
    pub timings: Timings,
}

/// Counters for `/health` and the tests: the load test checks that every
/// disconnected client's generation was cancelled and none is left running.
#[derive(Debug, Default)]
pub struct Counters {
    pub waiting: AtomicUsize,
    pub in_flight: AtomicUsize,
    pub completed: AtomicU64,
    pub cancelled: AtomicU64,
    pub failed: AtomicU64,
    /// Turned away because the queue was full.
    pub rejected: AtomicU64,
    /// Requests whose generation panicked: each failed alone (500) and
    /// the engine went on with a fresh session.
    pub panicked: AtomicU64,
    /// Set when the engine thread has ended, so `/health` stops saying ok.
    pub engine_stopped: std::sync::atomic::AtomicBool,
    pub prompt_tokens: AtomicU64,
    pub cached_tokens: AtomicU64,
    pub generated_tokens: AtomicU64,
    /// Decode speed of the last finished generation, in f64 bits.
    pub last_decode_tok_s: AtomicU64,
}

/// The queue's sending end, as the handlers see it.
#[derive(Clone)]
pub struct Queue {
    tx: mpsc::Sender<Job>,
    capacity: usize,
    pub counters: Arc<Counters>,
}

/// Why a job was not queued.
pub enum Refused {
    Full,
    Stopped,
}

impl Queue {
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn submit(&self, job: Job) -> Result<(), Refused> {
        // Counted before sending: the worker may take the job at once.
        self.counters.waiting.fetch_add(1, Ordering::SeqCst);
        match self.tx.try_send(job) {
            Ok(()) => Ok(()),
            Err(e) => {
                self.counters.waiting.fetch_sub(1, Ordering::SeqCst);
                match e {
                    mpsc::error::TrySendError::Full(_) => {
                        self.counters.rejected.fetch_add(1, Ordering::Relaxed);
                        Err(Refused::Full)
                    }
                    mpsc::error::TrySendError::Closed(_) => Err(Refused::Stopped),
                }
            }
        }
    }
}

/// Starts the engine thread, which runs up to `parallel` requests at once.
/// `load` runs on it first; until it returns, `engine` stays empty (the
/// server answers "loading"), and its error, if any, comes back through
/// `loaded`.
pub fn start(
    capacity: usize,
    parallel: usize,
    token_delay: Duration,
    engine: Arc<OnceLock<Arc<Engine>>>,
    load: Box<dyn FnOnce() -> Result<Engine, String> + Send>,
    loaded: tokio::sync::oneshot::Sender<Result<(), String>>,
) -> std::io::Result<Queue> {
    let (tx, mut rx) = mpsc::channel::<Job>(capacity.max(1));
    let counters = Arc::new(Counters::default());
    let c = Arc::clone(&counters);
    let engine_thread = std::thread::Builder::new()
        .name("smoe-engine".into())
        .spawn(move || {
            let e = match load() {
                Ok(e) => Arc::new(e),
                Err(msg) => {
                    let _ = loaded.send(Err(msg));
                    return;
                }
            };
            let _ = engine.set(Arc::clone(&e));
            let _ = loaded.send(Ok(()));
            let mut batch = Batch::new(&e, parallel);
            while admit(&e, &mut batch, &mut rx, &c) {
                let gone = batch.cancel(|r| r.job.events.is_closed()).len();
                c.cancelled.fetch_add(gone as u64, Ordering::SeqCst);
                c.in_flight.fetch_sub(gone, Ordering::SeqCst);
                if batch.is_empty() {
                    continue;
                }
                let stepped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    batch.step(|r, tok| r.on_token(tok, &c))
                }));
                match stepped {
                    Ok(Ok(finished)) => {
                        for f in finished {
                            finish(f, &c);
                            c.in_flight.fetch_sub(1, Ordering::SeqCst);
                        }
                    }
                    Ok(Err(err)) => {
                        for r in batch.clear() {
                            fail(&c, &r.job.events, err.to_string());
                            c.in_flight.fetch_sub(1, Ordering::SeqCst);
                        }
                    }
                    Err(panic) => {
                        // The sessions may be half-updated; the batch starts
                        // again from empty ones rather than wrong state.
                        let what = panic
                            .downcast_ref::<&str>()
                            .map(|s| s.to_string())
                            .or_else(|| panic.downcast_ref::<String>().cloned())
                            .unwrap_or_default();
                        for r in batch.clear() {
                            c.panicked.fetch_add(1, Ordering::SeqCst);
                            let msg = format!("internal error in the engine: {what}");
                            fail(&c, &r.job.events, msg);
                            c.in_flight.fetch_sub(1, Ordering::SeqCst);
                        }
                    }
                }
                if !token_delay.is_zero() {
                    std::thread::sleep(token_delay);
                }
            }
        })?;
    let stopped = Arc::clone(&counters);
    // Whatever ends the engine thread, /health must say so.
    std::thread::Builder::new()
        .name("smoe-engine-watch".into())
        .spawn(move || {
            let _ = engine_thread.join();
            stopped.engine_stopped.store(true, Ordering::SeqCst);
        })?;
    Ok(Queue {
        tx,
        capacity: capacity.max(1),
        counters,
    })
}

/// A job in the batch, with its reply's text state.
struct Running<'e> {
    job: Job,
    prompt_tokens: usize,
    text: TextStream<'e>,
    stops: StopStrings,
    stopped_by: Option<String>,
    failure: Option<String>,
}

/// Moves waiting jobs into free slots: when nothing runs, waits for one.
/// False once the queue is closed and nothing runs: the thread may end.
fn admit<'e>(
    engine: &'e Engine,
    batch: &mut Batch<'e, Running<'e>>,
    rx: &mut mpsc::Receiver<Job>,
    c: &Counters,
) -> bool {
    while !batch.is_full() {
        let mut job = if batch.is_empty() {
            match rx.blocking_recv() {
                Some(job) => job,
                None => return false,
            }
        } else {
            match rx.try_recv() {
                Ok(job) => job,
                Err(_) => break,
            }
        };
        c.waiting.fetch_sub(1, Ordering::SeqCst);
        if job.events.is_closed() {
            // Gone while waiting: nothing to run.
            c.cancelled.fetch_add(1, Ordering::SeqCst);
            continue;
        }
        let req = Request {
            prompt: std::mem::take(&mut job.prompt),
            params: job.params.clone(),
            max_tokens: job.max_tokens,
        };
        let running = Running {
            prompt_tokens: req.prompt.len(),
            text: TextStream::new(engine),
            stops: StopStrings::new(job.stop.clone()),
            stopped_by: None,
            failure: None,
            job,
        };
        match batch.join(running, &req) {
            Ok(_) => {
                c.in_flight.fetch_add(1, Ordering::SeqCst);
            }
            Err((r, e)) => fail(c, &r.job.events, e.to_string()),
        }
    }
    true
}

impl Running<'_> {
    /// Streams a token's text unless a stop string ends it; breaks on a
    /// stop string, an undecodable token or a client that went away.
    fn on_token(&mut self, tok: u32, c: &Counters) -> ControlFlow<()> {
        self.job.clock.token();
        c.generated_tokens.fetch_add(1, Ordering::Relaxed);
        match self.text.push(tok) {
            Ok(Some(piece)) => {
                let (ready, hit) = self.stops.push(&piece);
                if !ready.is_empty() {
                    let _ = self.job.events.send(Event::Text(ready));
                }
                if hit.is_some() {
                    self.stopped_by = hit;
                    return ControlFlow::Break(());
                }
            }
            Ok(None) => {}
            Err(e) => {
                self.failure = Some(e.to_string());
                return ControlFlow::Break(());
            }
        }
        if self.job.events.is_closed() {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    }
}

/// Ends a job that left the batch: the rest of its text and its outcome.
fn finish(f: Finished<Running<'_>>, c: &Counters) {
    let Finished {
        key: mut r,
        generation: gen,
        cached,
    } = f;
    let events = &r.job.events;
    if let Some(msg) = r.failure.take() {
        return fail(c, events, msg);
    }
    c.prompt_tokens
        .fetch_add(r.prompt_tokens as u64, Ordering::Relaxed);
    c.cached_tokens.fetch_add(cached as u64, Ordering::Relaxed);
    c.last_decode_tok_s
        .store(gen.timings.decode_tok_s().to_bits(), Ordering::Relaxed);
    let mut finish = match (r.stopped_by.take(), gen.stop_reason) {
        (Some(s), _) => Finish::Stop(s),
        (None, StopReason::Cancelled) => {
            c.cancelled.fetch_add(1, Ordering::SeqCst);
            return;
        }
        (None, StopReason::Eos) => Finish::Eos,
        (None, StopReason::Length) => Finish::Length,
    };
    if !matches!(finish, Finish::Stop(_)) {
        let tail = match r.text.finish() {
            Ok(t) => t.unwrap_or_default(),
            Err(e) => return fail(c, events, e.to_string()),
        };
        let (mut ready, hit) = r.stops.push(&tail);
        match hit {
            Some(s) => finish = Finish::Stop(s),
            None => ready += &r.stops.finish(),
        }
        if !ready.is_empty() {
            let _ = events.send(Event::Text(ready));
        }
    }
    let outcome = Outcome {
        finish,
        prompt_tokens: r.prompt_tokens,
        cached_tokens: cached,
        completion_tokens: gen.tokens.len(),
        timings: gen.timings,
    };
    let _ = events.send(Event::Done(outcome));
    c.completed.fetch_add(1, Ordering::SeqCst);
}

fn fail(c: &Counters, events: &mpsc::UnboundedSender<Event>, msg: String) {
    c.failed.fetch_add(1, Ordering::SeqCst);
    let _ = events.send(Event::Failed(msg));
}
