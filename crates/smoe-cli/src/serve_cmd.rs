//! `smoe serve`: the model behind OpenAI- and Anthropic-compatible HTTP
//! routes and a web chat page (the server itself is the smoe-server crate).

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;

use crate::ModelArgs;

#[derive(Args)]
pub struct ServeArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Address to listen on; the default serves this machine only.
    #[arg(long, default_value = "127.0.0.1")]
    host: IpAddr,
    /// Port to listen on (0: any free one, printed at start).
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Require this key (Authorization: Bearer KEY, or x-api-key: KEY) on
    /// every /v1 route.
    #[arg(long, value_name = "KEY")]
    api_key: Option<String>,
    /// Requests that may wait while others run; more get 429 and Retry-After.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..))]
    queue: u64,
    /// Requests decoding at once, as one batch: each step reads an expert
    /// once for every request routed to it. Each has a KV cache of up to
    /// --ctx tokens, which the memory plan counts. 1 runs them one by one.
    #[arg(long, default_value_t = 4, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=256))]
    parallel: u64,
    /// Model id to report in /v1/models and replies (default: the
    /// directory's name).
    #[arg(long, value_name = "NAME")]
    served_model_name: Option<String>,
    /// Skip the start-up check of tokenizer, template and memory.
    #[arg(long)]
    no_check: bool,
    /// Sleep this long after each token, so that the tests can disconnect
    /// from a reply that is still streaming, on any machine.
    #[arg(long, hide = true, default_value_t = 0)]
    token_delay_ms: u64,
    /// Seconds a client may take to send a request's headers, and then its
    /// body; slower connections are closed (headers) or get 408 (body).
    #[arg(long, default_value_t = 10.0, value_name = "SECS")]
    read_timeout: f64,
}

pub fn serve_cmd(mut a: ServeArgs) -> Result<()> {
    if a.api_key.as_deref().is_some_and(str::is_empty) {
        bail!("--api-key must not be empty");
    }
    // Without --model: the built-in model's vault (converted on first use).
    a.model.resolve()?;
    a.model.parallel = a.parallel as usize;
    let dir = a.model.model.clone();
    let model_name = a.served_model_name.unwrap_or_else(|| match a.model.given {
        None => "smoe-builtin".into(),
        Some(_) => dir
            .canonicalize()
            .unwrap_or_else(|_| dir.clone())
            .file_name()
            .map_or_else(|| "smoe".into(), |n| n.to_string_lossy().into_owned()),
    });
    let config = smoe_server::Config {
        addr: SocketAddr::new(a.host, a.port),
        model_name,
        api_key: a.api_key,
        ctx: a.model.ctx,
        queue: a.queue as usize,
        parallel: a.parallel as usize,
        token_delay: Duration::from_millis(a.token_delay_ms),
        read_timeout: Duration::try_from_secs_f64(a.read_timeout)
            .ok()
            .filter(|d| !d.is_zero())
            .with_context(|| {
                format!(
                    "--read-timeout {}: expected a positive number of seconds",
                    a.read_timeout
                )
            })?,
    };
    let (model, check) = (a.model, !a.no_check);
    let load = Box::new(move || {
        let (engine, warnings) =
            crate::load_checked(&model, check).map_err(|e| format!("{e:#}"))?;
        for w in warnings {
            eprintln!("{w}");
        }
        if !engine.has_tokenizer() || engine.template().is_none() {
            return Err(format!(
                "{}: smoe serve needs tokenizer.json and a chat template",
                model.model.display()
            ));
        }
        if let Some(plan) = engine.plan() {
            eprintln!("{}", crate::describe_plan(plan));
        }
        eprintln!("device: {}", engine.device());
        eprintln!("model loaded; ready");
        Ok(engine)
    });
    smoe_server::serve(config, load, |addr| {
        eprintln!(
            "smoe serve: listening on http://{addr} (loading {})",
            dir.display()
        );
    })?;
    Ok(())
}
