//! One engine, many clients: requests wait in a bounded queue and a single
//! thread runs them in order on the engine, keeping one session so that a
//! request extending the previous conversation prefills only its new tokens.
//! Each job streams its text back over its own channel; a client that went
//! away closes that channel, and generation stops at the next token.

use std::ops::ControlFlow;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

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

/// Starts the engine thread. `load` runs on it first; until it returns,
/// `engine` stays empty (the server answers "loading"), and its error, if
/// any, comes back through `loaded`.
pub fn start(
    capacity: usize,
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
            let mut session = e.new_session();
            while let Some(job) = rx.blocking_recv() {
                c.waiting.fetch_sub(1, Ordering::SeqCst);
                if job.events.is_closed() {
                    // Gone while waiting: nothing to run.
                    c.cancelled.fetch_add(1, Ordering::SeqCst);
                    continue;
                }
                c.in_flight.fetch_add(1, Ordering::SeqCst);
                let events = job.events.clone();
                let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    run(&e, &mut session, job, &c, token_delay)
                }));
                if let Err(panic) = ran {
                    // The session may be half-updated; the next request
                    // starts from an empty one rather than wrong state.
                    session = e.new_session();
                    c.panicked.fetch_add(1, Ordering::SeqCst);
                    let what = panic
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_default();
                    fail(&c, &events, format!("internal error in the engine: {what}"));
                }
                c.in_flight.fetch_sub(1, Ordering::SeqCst);
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

fn run(
    engine: &Engine,
    session: &mut smoe::model::Session,
    job: Job,
    c: &Counters,
    token_delay: Duration,
) {
    let cached = session.reuse_prefix(&job.prompt);
    let mut text = TextStream::new(engine);
    let mut stops = StopStrings::new(job.stop);
    let mut stopped_by: Option<String> = None;
    let mut failure: Option<String> = None;
    let events = &job.events;
    let mut clock = job.clock;
    let result = engine.generate(
        session,
        &job.prompt[cached..],
        &job.params,
        job.max_tokens,
        |tok| {
            clock.token();
            c.generated_tokens.fetch_add(1, Ordering::Relaxed);
            match text.push(tok) {
                Ok(Some(piece)) => {
                    let (ready, hit) = stops.push(&piece);
                    if !ready.is_empty() {
                        let _ = events.send(Event::Text(ready));
                    }
                    if hit.is_some() {
                        stopped_by = hit;
                        return ControlFlow::Break(());
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    failure = Some(e.to_string());
                    return ControlFlow::Break(());
                }
            }
            if !token_delay.is_zero() {
                std::thread::sleep(token_delay);
            }
            if events.is_closed() {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        },
    );
    let gen = match (result, failure) {
        (Ok(gen), None) => gen,
        (Err(e), _) => return fail(c, events, e.to_string()),
        (_, Some(msg)) => return fail(c, events, msg),
    };
    c.prompt_tokens
        .fetch_add(job.prompt.len() as u64, Ordering::Relaxed);
    c.cached_tokens.fetch_add(cached as u64, Ordering::Relaxed);
    c.last_decode_tok_s
        .store(gen.timings.decode_tok_s().to_bits(), Ordering::Relaxed);
    let mut finish = match (stopped_by, gen.stop_reason) {
        (Some(s), _) => Finish::Stop(s),
        (None, StopReason::Cancelled) => {
            c.cancelled.fetch_add(1, Ordering::SeqCst);
            return;
        }
        (None, StopReason::Eos) => Finish::Eos,
        (None, StopReason::Length) => Finish::Length,
    };
    if !matches!(finish, Finish::Stop(_)) {
        let tail = match text.finish() {
            Ok(t) => t.unwrap_or_default(),
            Err(e) => return fail(c, events, e.to_string()),
        };
        let (mut ready, hit) = stops.push(&tail);
        match hit {
            Some(s) => finish = Finish::Stop(s),
            None => ready += &stops.finish(),
        }
        if !ready.is_empty() {
            let _ = events.send(Event::Text(ready));
        }
    }
    let outcome = Outcome {
        finish,
        prompt_tokens: job.prompt.len(),
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
