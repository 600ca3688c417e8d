//! The ML subcommands: `models`, `data fetch`, `corrupt`, `bench train` (via `commands::bench`)
//! and `report`. Each is a thin call into a library crate (`deeprepair-nn`, `-data`,
//! `-corrupt`, `-train`, `-report`); what lives here is argument checking and printing.

use crate::commands::{pick_run, write_atomically, StoreArgs};
use anyhow::Context;
use clap::builder::TypedValueParser;
use clap::{Args, Subcommand};
use deeprepair_corrupt::{corrupt_image, image_seed, Assets, Corruption, FrostTextures};
use deeprepair_data::{decode_image, encode_png, load_dataset, Split};
use deeprepair_nn::{param_count, Arch};
use deeprepair_pipeline::did_you_mean;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// Bad user input (a missing or unreadable file, an out-of-range value): the binary exits
/// with code 2 and prints the message.
#[derive(Debug)]
pub struct UsageError(pub String);

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

fn usage(msg: impl Into<String>) -> anyhow::Error {
    UsageError(msg.into()).into()
}

/// Whether `e` (or anything it wraps) is bad user input.
pub fn is_usage_error(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.is::<UsageError>())
}

/// Prints `text` on stdout; a closed pipe (`| head`) ends the output quietly instead of
/// panicking as `println!` would.
pub(crate) fn emit(text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}

/// Parses a corruption name (clap value parser: an error here exits with code 2).
pub fn parse_corruption(s: &str) -> Result<Corruption, String> {
    if let Some(c) = Corruption::from_name(s) {
        return Ok(c);
    }
    let names: Vec<&str> = Corruption::ALL.iter().map(|c| c.name()).collect();
    let hint = did_you_mean(s, names.iter().copied());
    Err(format!(
        "unknown corruption '{s}'{hint}; the 15 corruptions are: {}",
        names.join(", ")
    ))
}

/// Parses an architecture name (clap value parser).
pub fn parse_arch(s: &str) -> Result<Arch, String> {
    if let Some(a) = Arch::from_name(s) {
        return Ok(a);
    }
    let names: Vec<&str> = Arch::ALL.iter().map(|a| a.name()).collect();
    let hint = did_you_mean(s, names.iter().copied());
    Err(format!(
        "unknown architecture '{s}'{hint}; expected one of: {}",
        names.join(", ")
    ))
}

/// 2243546 → "2,243,546".
fn thousands(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, ch) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

#[derive(Args)]
pub struct ModelsArgs {
    /// Number of output classes the parameter counts are for.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    classes: u32,
}

pub fn models(args: ModelsArgs) -> anyhow::Result<ExitCode> {
    let classes = args.classes as usize;
    let mut out = format!("{:<20} {:>12}\n", "arch", "params");
    for &arch in Arch::ALL {
        out += &format!(
            "{:<20} {:>12}\n",
            arch.name(),
            thousands(param_count(arch, classes))
        );
    }
    out += &format!("({classes} classes)\n");
    emit(&out)?;
    Ok(ExitCode::SUCCESS)
}

#[derive(Subcommand)]
pub enum DataCommand {
    /// Download, verify and unpack a dataset; prints the folder holding its files.
    Fetch(FetchArgs),
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum FetchDataset {
    /// The CIFAR-10 binary tarball (cifar-10-binary.tar.gz).
    Cifar10,
}

#[derive(Args)]
pub struct FetchArgs {
    /// Which dataset.
    #[arg(value_enum)]
    dataset: FetchDataset,
    /// Where to download from (http://, https://, file:// or a plain path).
    #[arg(long, default_value = deeprepair_data::CIFAR10_BINARY_URL)]
    url: String,
    /// Expected SHA-256 of the tarball (64 hex digits); a mismatch is an error.
    #[arg(long, value_name = "HEX")]
    sha256: Option<String>,
    /// Where to unpack (the .bin files end up in DEST/cifar-10-batches-bin).
    #[arg(long, default_value = "data")]
    dest: PathBuf,
    /// No progress bar.
    #[arg(long)]
    no_progress: bool,
}

pub fn data(what: DataCommand) -> anyhow::Result<ExitCode> {
    match what {
        DataCommand::Fetch(a) => fetch(a),
    }
}

fn fetch(args: FetchArgs) -> anyhow::Result<ExitCode> {
    match args.dataset {
        FetchDataset::Cifar10 => {}
    }
    if let Some(s) = &args.sha256 {
        let t = s.trim();
        if t.len() != 64 || !t.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(usage(format!(
                "--sha256 '{s}' is not 64 hexadecimal digits"
            )));
        }
    }
    let progress = !args.no_progress && std::io::IsTerminal::is_terminal(&std::io::stderr());
    let dir =
        deeprepair_data::fetch_cifar10(&args.url, args.sha256.as_deref(), &args.dest, progress)
            .context("data fetch cifar10")?;
    emit(&format!("{}\n", dir.display()))?;
    Ok(ExitCode::SUCCESS)
}

#[derive(Args)]
pub struct CorruptArgs {
    /// One of the 15 CIFAR-10-C corruptions (gaussian_noise … jpeg_compression).
    #[arg(long, value_name = "NAME", value_parser = parse_corruption,
          required_unless_present = "sheet", conflicts_with = "sheet")]
    corruption: Option<Corruption>,
    /// Severity 1-5.
    #[arg(long, value_parser = clap::value_parser!(u8).range(1..=5),
          required_unless_present = "sheet", conflicts_with = "sheet")]
    severity: Option<u8>,
    /// Seed of the random corruptions.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Folder with the frost textures (frost1.png … frost6.jpg); needed for frost.
    #[arg(long, value_name = "DIR")]
    frost: Option<PathBuf>,
    /// Instead of one image: write a contact sheet (rows: the corruptions, columns: clean and
    /// severities 1-5) of one test image of --data to this PNG.
    #[arg(long, value_name = "OUT.png", requires = "data")]
    sheet: Option<PathBuf>,
    /// Dataset for --sheet (CIFAR-10 binary folder, image folder or encoded dataset).
    #[arg(long, value_name = "PATH", requires = "sheet")]
    data: Option<PathBuf>,
    /// Which test image of --data goes on the sheet.
    #[arg(long, default_value_t = 0)]
    index: usize,
    /// Input image (PNG or JPEG).
    #[arg(
        value_name = "IN",
        required_unless_present = "sheet",
        conflicts_with = "sheet"
    )]
    input: Option<PathBuf>,
    /// Output PNG.
    #[arg(
        value_name = "OUT",
        required_unless_present = "sheet",
        conflicts_with = "sheet"
    )]
    output: Option<PathBuf>,
}

fn load_frost(dir: Option<&Path>) -> anyhow::Result<Assets> {
    let frost = match dir {
        Some(d) => Some(FrostTextures::load(d).map_err(|e| usage(format!("--frost: {e}")))?),
        None => None,
    };
    Ok(Assets { frost })
}

/// An RGB image file (PNG or JPEG) the user named as `what`; unreadable or undecodable is a
/// usage error naming it.
pub(crate) fn read_image(path: &Path, what: &str) -> anyhow::Result<(Vec<u8>, usize, usize)> {
    let bytes = std::fs::read(path)
        .map_err(|e| usage(format!("cannot read {what} image {}: {e}", path.display())))?;
    decode_image(&bytes).map_err(|e| usage(format!("{what} image {}: {e}", path.display())))
}

/// Our image outputs are PNG: a path that promises another format is refused rather than
/// given PNG bytes under a misleading name.
pub(crate) fn require_png(path: &Path) -> anyhow::Result<()> {
    let is_png = path
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("png"));
    if !is_png {
        return Err(usage(format!(
            "{}: the output is a PNG image; give a path ending in .png",
            path.display()
        )));
    }
    Ok(())
}

pub fn corrupt(args: CorruptArgs) -> anyhow::Result<ExitCode> {
    for out in [&args.sheet, &args.output].into_iter().flatten() {
        require_png(out)?;
    }
    if let Some(sheet) = &args.sheet {
        let data = args.data.as_deref().context("--sheet needs --data PATH")?;
        return corrupt_sheet(sheet, data, args.index, args.seed, args.frost.as_deref());
    }
    let (Some(c), Some(severity), Some(input), Some(output)) =
        (args.corruption, args.severity, &args.input, &args.output)
    else {
        return Err(usage(
            "corrupt needs --corruption NAME --severity S IN OUT (or --sheet OUT.png --data PATH)",
        ));
    };
    if c == Corruption::Frost && args.frost.is_none() {
        return Err(usage(
            "the frost corruption needs --frost DIR, a folder with frost1.png, frost2.png, \
             frost3.png, frost4.jpg, frost5.jpg, frost6.jpg",
        ));
    }
    let res = load_frost(args.frost.as_deref())?;
    let (pixels, w, h) = read_image(input, "input")?;
    let out = corrupt_image(
        &pixels,
        w,
        h,
        c,
        severity,
        image_seed(args.seed, 0, c, severity),
        &res,
    )
    .with_context(|| format!("{c} severity {severity} on {}", input.display()))?;
    let png = encode_png(&out, w, h)?;
    write_atomically(output, &png)?;
    emit(&format!("{}\n", output.display()))?;
    Ok(ExitCode::SUCCESS)
}

fn corrupt_sheet(
    out: &Path,
    data: &Path,
    index: usize,
    seed: u64,
    frost: Option<&Path>,
) -> anyhow::Result<ExitCode> {
    let res = load_frost(frost)?;
    let ds = load_dataset(data, Split::Test)
        .map_err(|e| usage(format!("--data {}: {e}", data.display())))?;
    if index >= ds.len() {
        return Err(usage(format!(
            "--index {index} is out of range: {} has {} test images",
            data.display(),
            ds.len()
        )));
    }
    let (w, h) = (ds.width, ds.height);
    let clean = ds.image(index);
    let mut cells: Vec<Vec<u8>> = Vec::new();
    let mut rows = Vec::new();
    for c in Corruption::ALL {
        if c == Corruption::Frost && res.frost.is_none() {
            eprintln!("note: frost row skipped (pass --frost DIR with frost1.png … frost6.jpg)");
            continue;
        }
        cells.push(clean.to_vec());
        for s in 1..=5u8 {
            let img = corrupt_image(
                clean,
                w,
                h,
                c,
                s,
                image_seed(seed, index as u64, c, s),
                &res,
            )
            .with_context(|| format!("{c} severity {s} on test image {index}"))?;
            cells.push(img);
        }
        rows.push(c.name().to_string());
    }
    let cols: Vec<String> = std::iter::once("clean".to_string())
        .chain((1..=5).map(|s| format!("severity {s}")))
        .collect();
    let refs: Vec<&[u8]> = cells.iter().map(|c| c.as_slice()).collect();
    let png = deeprepair_report::contact_sheet(&refs, w, h, 6, 4, &rows, &cols)?;
    write_atomically(out, &png)?;
    emit(&format!("{}\n", out.display()))?;
    Ok(ExitCode::SUCCESS)
}

/// `bench train`: training/eval throughput of one architecture on the CPU or a GPU.
#[derive(Args)]
pub struct BenchTrainArgs {
    /// Architecture (tiny-cnn, allconv, densenet, densenet-bc-100-12, wrn-40-2).
    #[arg(long, default_value = "tiny-cnn", value_parser = parse_arch)]
    arch: Arch,
    /// Batch size.
    #[arg(long, default_value_t = 128, value_parser = clap::value_parser!(u32).range(2..=65_536))]
    batch: u32,
    /// Train with the JSD consistency loss (3 views per image); the loop rows then build
    /// every batch with the real AugMix source.
    #[arg(long)]
    jsd: bool,
    /// Timed optimizer steps (after one warm-up step).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    steps: u32,
    /// Run on this CUDA device (needs a build with `--features cuda`).
    #[arg(long, value_name = "ORDINAL")]
    gpu: Option<usize>,
    /// Batches built ahead on a producer thread in the loop rows (compared with 0).
    #[arg(long, value_name = "DEPTH", default_value_t = deeprepair_train::trainer::DEFAULT_PREFETCH,
          value_parser = clap::value_parser!(u64).range(0..=64).map(|v| v as usize))]
    prefetch: usize,
    /// Data-parallel ranks in the loop rows, all on the chosen device (threads sharing it):
    /// the cost of sharding and reducing, not a multi-GPU speed-up.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=64).map(|v| v as usize))]
    ranks: usize,
    /// With --ranks > 1: synchronized BatchNorm in the loop rows.
    #[arg(long)]
    sync_bn: bool,
}

pub fn bench_train(args: BenchTrainArgs) -> anyhow::Result<ExitCode> {
    let device = match args.gpu {
        None => candle_core::Device::Cpu,
        Some(ordinal) => candle_core::Device::new_cuda(ordinal).map_err(|e| {
            anyhow::anyhow!(
                "--gpu {ordinal}: cannot open CUDA device {ordinal}: {e} \
                 (GPU runs need a build with `--features cuda` and a visible device)"
            )
        })?,
    };
    let batch = args.batch as usize;
    let steps = args.steps as usize;
    let r = deeprepair_train::bench::bench_train(args.arch, batch, args.jsd, steps, &device)
        .with_context(|| format!("bench train {}", args.arch.name()))?;
    let device_name = match args.gpu {
        None => "cpu".to_string(),
        Some(o) => format!("cuda:{o}"),
    };
    // NVML's kernel-busy percentage and peak device memory over the timed section.
    let gpu = |u: Option<deeprepair_train::gpu_usage::GpuUsage>| match u {
        Some(u) => (
            format!("{:.0}%", u.utilization_percent),
            u.peak_memory_mib.to_string(),
        ),
        None => ("-".to_string(), "-".to_string()),
    };
    let row = |train: &str,
               eval: &str,
               batches: &str,
               prefetch: &str,
               ranks: &str,
               util: &str,
               mib: &str| {
        format!(
            "{:<20} {:>6} {:<5} {:<7} {train:>14} {eval:>14}  {batches:<10} {prefetch:>8} \
             {ranks:>7} {util:>9} {mib:>9}\n",
            r.arch, r.batch, r.jsd, device_name
        )
    };
    let mut out = format!(
        "{:<20} {:>6} {:<5} {:<7} {:>14} {:>14}  {:<10} {:>8} {:>7} {:>9} {:>9}\n",
        "arch",
        "batch",
        "jsd",
        "device",
        "train img/s",
        "eval img/s",
        "batches",
        "prefetch",
        "ranks",
        "GPU util",
        "GPU MiB"
    );
    let (train_util, train_mib) = gpu(r.train_gpu);
    let (eval_util, _) = gpu(r.eval_gpu);
    out += &row(
        &format!("{:.1}", r.train_images_per_second),
        &format!("{:.1}", r.eval_images_per_second),
        "fixed",
        "-",
        "1",
        &format!("{train_util}/{eval_util}"),
        &train_mib,
    );
    // The real loop: the method's batch construction on every step.
    let (source, label): (Box<dyn deeprepair_train::BatchSource>, &str) = if args.jsd {
        (deeprepair_stages::methods::augmix_source(), "augmix")
    } else {
        (
            Box::new(deeprepair_train::trainer::StandardAugment),
            "crop+flip",
        )
    };
    let mut depths = vec![0];
    if args.prefetch != 0 {
        depths.push(args.prefetch);
    }
    let ranks = if args.sync_bn && args.ranks > 1 {
        format!("{}+sync", args.ranks)
    } else {
        args.ranks.to_string()
    };
    for depth in depths {
        let options = deeprepair_train::bench::LoopOptions {
            prefetch: depth,
            ranks: args.ranks,
            sync_batch_norm: args.sync_bn,
        };
        let l = deeprepair_train::bench::bench_train_loop(
            args.arch, batch, steps, &*source, options, &device,
        )
        .with_context(|| format!("bench train {} (loop, prefetch {depth})", args.arch.name()))?;
        let (util, mib) = gpu(l.gpu);
        out += &row(
            &format!("{:.1}", l.train_images_per_second),
            "-",
            label,
            &depth.to_string(),
            &ranks,
            &util,
            &mib,
        );
    }
    out += "(fixed: the model alone on one prepared batch; other rows: the training loop building \
            every batch, with `prefetch` batches built ahead on another thread and `ranks` data-parallel \
            ranks sharing the device. GPU util: NVML's \
            kernel-busy time over the timed steps (fixed row: train/eval); GPU MiB: peak device \
            memory in use; - on the CPU or without NVML)\n";
    emit(&out)?;
    Ok(ExitCode::SUCCESS)
}

/// `bench augment`: CPU augmentation images/second per thread count.
#[derive(Args)]
pub struct BenchAugmentArgs {
    /// Thread counts to measure (one rayon pool each), e.g. 1,2,4.
    #[arg(long, value_delimiter = ',', default_values_t = [1usize, 2],
          value_parser = clap::value_parser!(u64).range(1..=1024).map(|v| v as usize))]
    threads: Vec<usize>,
    /// Images augmented per measurement.
    #[arg(long, default_value_t = 512, value_parser = clap::value_parser!(u64).range(1..=1_000_000).map(|v| v as usize))]
    images: usize,
    /// Batch size (images per `make_batch` call, as in training).
    #[arg(long, default_value_t = 128, value_parser = clap::value_parser!(u64).range(1..=65_536).map(|v| v as usize))]
    batch: usize,
    /// Real images: a CIFAR-10 binary folder or an image folder with test/ (its test split is
    /// used, spread over all classes); default: seeded synthetic 32×32 images.
    #[arg(long, value_name = "DIR")]
    data: Option<PathBuf>,
}

pub fn bench_augment(args: BenchAugmentArgs) -> anyhow::Result<ExitCode> {
    let (images, labels, (h, w), origin) = match &args.data {
        Some(dir) => {
            let ds = load_dataset(dir, Split::Test)
                .map_err(|e| usage(format!("--data {}: {e}", dir.display())))?;
            if ds.is_empty() {
                return Err(usage(format!("--data {}: no test images", dir.display())));
            }
            // Spread over the whole split (image folders are sorted by class).
            let idx: Vec<usize> = (0..args.images)
                .map(|i| i * ds.len() / args.images)
                .collect();
            let sub = ds.subset(&idx);
            (
                sub.images,
                sub.labels,
                (ds.height, ds.width),
                dir.display().to_string(),
            )
        }
        None => {
            let (i, l) = deeprepair_train::bench::synthetic_images(args.images, 7);
            (i, l, (32, 32), "synthetic 32×32".to_string())
        }
    };
    let n = labels.len();
    let num_classes = labels.iter().copied().max().unwrap_or(0) as usize + 1;
    let data = deeprepair_train::TrainData {
        images: &images,
        labels: &labels,
        n,
        height: h,
        width: w,
        num_classes,
    };
    // DeepRepair's style references: the images themselves stand in for collected failures.
    let failures = deeprepair_data::Dataset {
        height: h,
        width: w,
        images: images.clone(),
        labels: labels.clone(),
        class_names: (0..num_classes).map(|c| format!("class{c}")).collect(),
        source_ids: None,
    };
    let sources: Vec<(&str, Box<dyn deeprepair_train::BatchSource>)> = vec![
        ("augmix", deeprepair_stages::methods::augmix_source()),
        (
            "deeprepair",
            deeprepair_stages::methods::deeprepair_source(&failures, 0.1, 0)?,
        ),
        (
            "deeprepair-style1",
            deeprepair_stages::methods::deeprepair_source(&failures, 1.0, 0)?,
        ),
    ];
    let mut out = format!(
        "{:<18} {:>7} {:>10} {:>16} {:>10}\n",
        "method", "threads", "images/s", "images/s/thread", "views/s"
    );
    for (name, source) in &sources {
        for &threads in &args.threads {
            let r = deeprepair_train::bench::bench_source(&**source, &data, args.batch, threads)
                .with_context(|| format!("bench augment {name} on {threads} threads"))?;
            out += &format!(
                "{:<18} {:>7} {:>10.1} {:>16.1} {:>10.1}\n",
                name,
                threads,
                r.images_per_second,
                r.images_per_second / threads as f64,
                r.augmented_views_per_second
            );
        }
    }
    out += &format!(
        "({n} images of {origin}, batches of {}; each image: crop + flip, then 2 augmented views \
         (JSD) besides the clean one; deeprepair: style op as a chain's first op with p = 0.1, \
         deeprepair-style1: p = 1)\n",
        args.batch
    );
    emit(&out)?;
    Ok(ExitCode::SUCCESS)
}

#[derive(Args)]
pub struct ReportArgs {
    /// A run id, or `latest`.
    #[arg(value_name = "RUN_OR_LATEST")]
    run: String,
    /// Where to unpack the report.
    #[arg(long)]
    out: PathBuf,
    #[command(flatten)]
    store: StoreArgs,
}

/// Keeps a stage path usable as a folder name.
fn folder_name(stage: &str) -> String {
    stage
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.=,".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

pub fn report(args: ReportArgs) -> anyhow::Result<ExitCode> {
    let run_id = match args.run.as_str() {
        "latest" => None,
        s => Some(s.parse::<u64>().map_err(|_| {
            usage(format!(
                "'{s}' is not a run id; give a number (see `deeprepair status`) or `latest`"
            ))
        })?),
    };
    let store = args.store.open()?;
    let run = pick_run(&store, run_id)?;
    let reports: Vec<_> = store
        .stage_runs(run.id)?
        .into_iter()
        .filter(|r| r.kind == "report")
        .collect();
    if reports.is_empty() {
        anyhow::bail!("run {} has no stage of kind report", run.id);
    }
    let found: Vec<_> = reports
        .iter()
        .filter_map(|r| r.outputs.get("report").map(|d| (r, *d)))
        .collect();
    if found.is_empty() {
        let states: Vec<String> = reports
            .iter()
            .map(|r| format!("{} ({:?})", r.stage, r.state).to_lowercase())
            .collect();
        anyhow::bail!(
            "run {}: no report stage produced a `report` artifact: {}",
            run.id,
            states.join(", ")
        );
    }
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let mut written = Vec::new();
    for (record, digest) in &found {
        let artifact = store.get_artifact(digest)?;
        if artifact.header.media_type != "application/x-tar" {
            anyhow::bail!(
                "{}: the report artifact {} is {}, not a tar",
                record.stage,
                digest.short(),
                artifact.header.media_type
            );
        }
        let dir = if found.len() == 1 {
            args.out.clone()
        } else {
            args.out.join(folder_name(&record.stage))
        };
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut archive = tar::Archive::new(artifact.bytes.as_slice());
        let entries = archive
            .entries()
            .with_context(|| format!("reading report artifact {}", digest.short()))?;
        for entry in entries {
            let mut entry =
                entry.with_context(|| format!("reading report artifact {}", digest.short()))?;
            let rel = entry.path()?.into_owned();
            // unpack_in refuses paths that would leave `dir` (absolute, `..`).
            if entry
                .unpack_in(&dir)
                .with_context(|| format!("unpacking {} into {}", rel.display(), dir.display()))?
                && entry.header().entry_type().is_file()
            {
                written.push(dir.join(&rel));
            }
        }
    }
    let list: String = written
        .iter()
        .map(|p| format!("{}\n", p.display()))
        .collect();
    emit(&list)?;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thousands_separators() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(2_243_546), "2,243,546");
    }

    #[test]
    fn suggestions() {
        assert_eq!(parse_corruption("fog"), Ok(Corruption::Fog));
        assert!(parse_corruption("fogg")
            .unwrap_err()
            .contains("did you mean 'fog'"));
        assert!(parse_corruption("gaussian-noise")
            .unwrap_err()
            .contains("'gaussian_noise'"));
        let e = parse_corruption("xyzzy").unwrap_err();
        assert!(!e.contains("did you mean") && e.contains("jpeg_compression"));
        assert!(parse_arch("wrn40-2").unwrap_err().contains("'wrn-40-2'"));
    }
}
