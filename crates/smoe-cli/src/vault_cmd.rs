//! Vault commands: `smoe convert`, `smoe verify` and `smoe inspect`.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use clap::Args;

use smoe::engine::Engine;
use smoe::model::{human_bytes, Budget, LoadOptions};
use smoe::vault::convert::{convert, ConvertOptions};
use smoe::vault::Vault;

use crate::{describe_plan, parse_budget, parse_device, set_threads};

#[derive(Args)]
pub(crate) struct ConvertArgs {
    /// Hugging Face checkpoint directory, or a GGUF file (or the first
    /// shard of a split set), whose blocks are copied as they are stored:
    /// --experts and --backbone do not apply to it.
    #[arg(value_name = "HF_DIR|FILE.gguf")]
    source: PathBuf,
    /// Vault directory to create.
    #[arg(short = 'o', long = "output", value_name = "VAULT_DIR")]
    output: PathBuf,
    /// Routed-expert type: q4_k, q4_0, q8_0, q6_k, q5_k or bf16.
    #[arg(long, default_value = "q4_k")]
    experts: String,
    /// Backbone type: bf16, q8_0 or q4_k. Norms stay f32 and routers bf16;
    /// under q4_k the LM head and attention v_proj get q6_k (as Q4_K_M).
    #[arg(long, default_value = "q4_k")]
    backbone: String,
    /// Allow 2- and 3-bit types (they ruin fine-grained MoE models).
    #[arg(long)]
    allow_lossy: bool,
    /// Worker threads (default: one per physical core).
    #[arg(long, value_name = "N")]
    threads: Option<usize>,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
    /// Simulate a crash after N expert layers (for testing resumption).
    #[arg(long, hide = true)]
    stop_after_layers: Option<usize>,
}

#[derive(Args)]
pub(crate) struct VerifyArgs {
    #[arg(value_name = "VAULT_DIR")]
    vault: PathBuf,
}

#[derive(Args)]
pub(crate) struct InspectArgs {
    #[arg(value_name = "PATH")]
    path: PathBuf,
    /// Budget to plan with, as for run.
    #[arg(long, default_value = "auto", value_parser = parse_budget)]
    ram_budget: Budget,
    /// Where the model would run, as for run: with CUDA the model is
    /// loaded onto the GPU and the device line says what went to VRAM.
    #[arg(long, default_value = "auto", value_parser = parse_device)]
    device: smoe::compute::Device,
    /// VRAM for routed experts on CUDA, as for run.
    #[arg(long, default_value = "auto", value_parser = parse_budget)]
    vram_budget: Budget,
}

pub(crate) fn convert_cmd(a: ConvertArgs) -> Result<()> {
    set_threads(a.threads)?;
    let parse = |flag: &str, v: &str| {
        smoe::kernels::DType::parse(v).ok_or_else(|| {
            anyhow::anyhow!("{flag} {v}: unknown type (q4_k, q4_0, q8_0, q6_k, q5_k, bf16)")
        })
    };
    let opts = ConvertOptions {
        experts: parse("--experts", &a.experts)?,
        backbone: parse("--backbone", &a.backbone)?,
        allow_lossy: a.allow_lossy,
        stop_after_layers: a.stop_after_layers,
    };
    convert_with_progress(&a.source, &a.output, &opts, a.quiet)
}

/// Converts behind a progress bar and reports sizes and quantization error
/// (unless `quiet`): `smoe convert`, and the built-in model on first use.
pub(crate) fn convert_with_progress(
    source: &Path,
    output: &Path,
    opts: &ConvertOptions,
    quiet: bool,
) -> Result<()> {
    let bar = if quiet {
        indicatif::ProgressBar::hidden()
    } else {
        let bar = indicatif::ProgressBar::new(0);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} converting [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
            )
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .progress_chars("=> "),
        );
        bar
    };
    let mut show = |p: smoe::vault::convert::Progress| {
        bar.set_length(p.total);
        bar.set_position(p.done);
    };
    let report = if smoe::gguf::is_gguf(source) {
        smoe::gguf::convert::convert(source, output, opts.stop_after_layers, &mut show)?
    } else {
        convert(source, output, opts, &mut show)?
    };
    bar.finish_and_clear();
    if !quiet {
        eprintln!(
            "wrote {} in {:.1}s: backbone {}, experts {}{}",
            report.dir.display(),
            report.seconds,
            human_bytes(report.backbone_bytes),
            human_bytes(report.expert_bytes),
            if report.resumed_layers > 0 {
                format!(
                    " (resumed after {} finished expert layers)",
                    report.resumed_layers
                )
            } else {
                String::new()
            }
        );
        eprintln!("stored as {}", report.quant);
        if !report.quant_error.is_empty() {
            eprintln!("quantization error (relative RMS of dequantized - original):");
        }
        for (class, err) in &report.quant_error {
            eprintln!("  {class:<32} {err:.5}");
        }
    }
    Ok(())
}

pub(crate) fn verify_cmd(a: VerifyArgs) -> Result<()> {
    let vault = Vault::open(&a.vault)?;
    let bad = vault.verify(&mut |_, _| {})?;
    if bad.is_empty() {
        println!("ok: every checksum of {} matches", a.vault.display());
        Ok(())
    } else {
        for b in &bad {
            println!("corrupt: {b}");
        }
        bail!(
            "{}: {} corrupt record(s), first: {}",
            a.vault.display(),
            bad.len(),
            bad[0]
        )
    }
}

pub(crate) fn inspect_cmd(a: InspectArgs) -> Result<()> {
    // A GGUF is described from its header, and then as the model it runs
    // as, where smoe runs its architecture.
    if smoe::gguf::is_gguf(&a.path) {
        let g = smoe::gguf::Gguf::open(&a.path)?;
        let mut out = std::io::stdout().lock();
        writeln!(out, "file: {}", a.path.display())?;
        for line in g.describe()? {
            writeln!(out, "{line}")?;
        }
        if smoe::gguf::config::family_of(&g).is_err() {
            return Ok(());
        }
    }
    let opts = LoadOptions {
        ram_budget: a.ram_budget,
        device: a.device,
        vram_budget: a.vram_budget,
        ..Default::default()
    };
    let engine = Engine::load_with(&a.path, &opts)?;
    let c = engine.config();
    let mut out = std::io::stdout().lock();
    writeln!(out, "model: {} ({:?})", a.path.display(), c.family)?;
    writeln!(
        out,
        "layers {} | hidden {} | heads {}/{} kv x {} | experts {} (top {}) x {} wide | vocab {} | context {}",
        c.num_hidden_layers,
        c.hidden_size,
        c.num_attention_heads,
        c.num_key_value_heads,
        c.head_dim,
        c.num_experts,
        c.num_experts_per_tok,
        c.moe_intermediate_size,
        c.vocab_size,
        c.max_position_embeddings
    )?;
    for line in c.describe() {
        writeln!(out, "{line}")?;
    }
    let moe_layers = (0..c.num_hidden_layers)
        .filter(|&i| c.is_moe_layer(i))
        .count() as u64;
    let expert_params =
        moe_layers * c.num_experts as u64 * 3 * (c.hidden_size * c.moe_intermediate_size) as u64;
    let active = moe_layers
        * c.num_experts_per_tok as u64
        * 3
        * (c.hidden_size * c.moe_intermediate_size) as u64;
    writeln!(
        out,
        "routed expert parameters: {:.3} B ({:.3} B active per token)",
        expert_params as f64 / 1e9,
        active as f64 / 1e9
    )?;
    if smoe::vault::is_vault(&a.path) {
        let vault = Vault::open(&a.path)?;
        let m = &vault.manifest;
        writeln!(out, "quant: {}", m.stored_quant())?;
        writeln!(
            out,
            "backbone bytes: {} | expert bytes: {}",
            human_bytes(vault.backbone_bytes()),
            human_bytes(vault.expert_bytes())
        )?;
        for (class, err) in &m.quant_error {
            writeln!(out, "  quant error {class:<32} {err:.5}")?;
        }
    }
    // The tiers above RAM: where the model runs and, on a GPU, which
    // layers' experts went to VRAM.
    writeln!(out, "device: {}", engine.device())?;
    if let Some(plan) = engine.plan() {
        writeln!(out, "{}", describe_plan(plan))?;
        // What bounds decode on a machine with the RAM for it: every
        // resident backbone byte and the routed experts' records, each token.
        let experts =
            plan.expert_bytes * c.num_experts_per_tok as u64 / c.num_experts.max(1) as u64;
        writeln!(
            out,
            "weights read per decoded token: {} (backbone {} + routed experts {})",
            human_bytes(plan.backbone_bytes + experts),
            human_bytes(plan.backbone_bytes),
            human_bytes(experts)
        )?;
    }
    Ok(())
}
