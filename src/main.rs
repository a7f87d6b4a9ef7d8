//! The `sd3` command line: a thin layer over the library.

use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use sd3_wgpu::gpu::{list_adapters, Gpu, GpuOptions};
use sd3_wgpu::{bench, DType};

#[derive(Parser)]
#[command(
    name = "sd3",
    version,
    about = "Stable Diffusion 3 on any GPU wgpu reaches"
)]
struct Cli {
    /// Backend: vulkan, metal, dx12 or gl (default: all).
    #[arg(long, global = true, env = "SD3_BACKEND")]
    backend: Option<String>,
    /// Adapter index (from `sd3 devices`) or a name substring.
    #[arg(long, global = true, env = "SD3_ADAPTER")]
    adapter: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// List every GPU adapter with backend, driver, type, limits and features.
    Devices,
    /// Show what a checkpoint holds: detected variant, parameters, dtypes, components.
    Inspect {
        /// A single .safetensors file or a diffusers folder.
        path: std::path::PathBuf,
    },
    /// Decode latents (a safetensors file with one tensor `latents` [b, 16, h, w]) to PNG.
    Decode {
        /// Checkpoint with the VAE: single file or diffusers folder.
        #[arg(long)]
        model: std::path::PathBuf,
        /// Latents file, as `generate --save-latents` writes it.
        #[arg(long)]
        latents: std::path::PathBuf,
        /// Output PNG (numbered -0, -1, … for a batch).
        #[arg(long, default_value = "image.png")]
        out: std::path::PathBuf,
        /// Decode in tiles of this many latent pixels (default: only when needed).
        #[arg(long)]
        vae_tile: Option<usize>,
        /// Overlap between tiles, in latent pixels.
        #[arg(long, default_value_t = 8)]
        tile_overlap: usize,
        /// Tile when a full-frame decode needs more than this many MiB of intermediates.
        #[arg(long)]
        vae_budget_mib: Option<u64>,
        /// Storage of the VAE's conv and linear weights.
        #[arg(long, value_enum, default_value_t = WeightType::F32)]
        dtype: WeightType,
    },
    /// Benchmarks.
    Bench {
        #[command(subcommand)]
        what: BenchWhat,
    },
}

#[derive(Subcommand)]
enum BenchWhat {
    /// Time linear and attention kernels at SD3 shapes.
    Kernels {
        /// Scaled-down shapes, for software adapters such as lavapipe.
        #[arg(long)]
        small: bool,
        /// Storage type of the linear weights.
        #[arg(long, value_enum, default_value_t = WeightType::F16)]
        weights: WeightType,
        /// Timed runs per case (the median is reported).
        #[arg(long, default_value_t = 5)]
        reps: usize,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum WeightType {
    F16,
    F32,
}

impl WeightType {
    fn dtype(self) -> DType {
        match self {
            WeightType::F16 => DType::F16,
            WeightType::F32 => DType::F32,
        }
    }
}

fn gpu_options(cli: &Cli) -> GpuOptions {
    GpuOptions {
        backend: cli.backend.clone(),
        adapter: cli.adapter.clone(),
        ..GpuOptions::from_env()
    }
}

fn devices(cli: &Cli) -> Result<(), Box<dyn std::error::Error>> {
    let adapters = list_adapters(cli.backend.as_deref())?;
    if adapters.is_empty() {
        println!("no GPU adapters found (install a Vulkan, Metal, DX12 or GL driver; on Linux without a GPU: mesa-vulkan-drivers)");
    }
    for a in adapters {
        let l = &a.limits;
        println!("{}", a.summary());
        println!("    driver: {} {}", a.info.driver, a.info.driver_info);
        println!(
            "    limits: max_buffer_size {} MiB, max_storage_buffer_binding_size {} MiB, workgroup storage {} KiB, invocations/workgroup {}, workgroups/dim {}, storage buffers/stage {}",
            l.max_buffer_size >> 20,
            l.max_storage_buffer_binding_size >> 20,
            l.max_compute_workgroup_storage_size >> 10,
            l.max_compute_invocations_per_workgroup,
            l.max_compute_workgroups_per_dimension,
            l.max_storage_buffers_per_shader_stage
        );
        let f = a.features;
        let has = |x: wgpu::Features| if f.contains(x) { "yes" } else { "no" };
        println!(
            "    features: shader-f16 {}, subgroup {}, timestamp-query {}, timestamps-inside-passes {}, cooperative-matrix {}",
            has(wgpu::Features::SHADER_F16),
            has(wgpu::Features::SUBGROUP),
            has(wgpu::Features::TIMESTAMP_QUERY),
            has(wgpu::Features::TIMESTAMP_QUERY_INSIDE_PASSES),
            has(wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX),
        );
    }
    Ok(())
}

fn bench_kernels(
    cli: &Cli,
    small: bool,
    weights: WeightType,
    reps: usize,
) -> Result<(), Box<dyn std::error::Error>> {
    let gpu = Gpu::new(&gpu_options(cli))?;
    println!(
        "adapter: {:?} {} ({})",
        gpu.info.backend, gpu.info.name, gpu.info.driver_info
    );
    if gpu.info.device_type == wgpu::DeviceType::Cpu {
        println!("note: a CPU adapter; these numbers say nothing about GPU performance");
    }
    let wd = weights.dtype();
    println!(
        "{:<48} {:>10} {:>10} {:>9}",
        "case", "ms", "GFLOP/s", "GB/s"
    );
    for case in bench::cases(!small) {
        let r = bench::run_case(&gpu, case, wd, reps)?;
        println!(
            "{:<48} {:>10.3} {:>10.1} {:>9.1}",
            r.name, r.ms, r.gflops, r.gbps
        );
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let r = match &cli.command {
        Command::Devices => devices(&cli),
        Command::Decode {
            model,
            latents,
            out,
            vae_tile,
            tile_overlap,
            vae_budget_mib,
            dtype,
        } => {
            let opts = sd3_wgpu::decode::DecodeOptions {
                model: model.clone(),
                latents: latents.clone(),
                out: out.clone(),
                tile: *vae_tile,
                overlap: *tile_overlap,
                budget: vae_budget_mib.map(|m| m << 20),
                matrix: dtype.dtype(),
            };
            Gpu::new(&gpu_options(&cli))
                .map_err(Into::into)
                .and_then(|gpu| {
                    let written = sd3_wgpu::decode::decode(&gpu, &opts)?;
                    for p in written {
                        println!("wrote {}", p.display());
                    }
                    Ok(())
                })
        }
        Command::Inspect { path } => sd3_wgpu::weights::inspect::inspect(path)
            .map(|r| print!("{r}"))
            .map_err(Into::into),
        Command::Bench {
            what:
                BenchWhat::Kernels {
                    small,
                    weights,
                    reps,
                },
        } => bench_kernels(&cli, *small, *weights, *reps),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
