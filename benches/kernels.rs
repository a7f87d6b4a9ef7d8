//! `cargo bench --bench kernels [-- --small] [-- --f32]`: linear and attention
//! at SD3 shapes on the default adapter (same cases as `sd3 bench kernels`),
//! printing the median time, GFLOP/s and GB/s of each f16- and f32-weight case.

use sd3_wgpu::{bench, DType, Gpu, GpuOptions};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let small = args.iter().any(|a| a == "--small");
    let gpu = match Gpu::new(&GpuOptions::from_env()) {
        Ok(g) => g,
        Err(e) => {
            eprintln!("no GPU: {e}");
            std::process::exit(1);
        }
    };
    println!(
        "adapter: {:?} {} ({})",
        gpu.info.backend, gpu.info.name, gpu.info.driver_info
    );
    println!("{}", bench::header());
    for dtype in [DType::F16, DType::F32] {
        let set = if small {
            bench::CaseSet::Small
        } else {
            bench::CaseSet::Sd3
        };
        for case in bench::cases(set) {
            if dtype == DType::F32 && matches!(case, bench::Case::Attention { .. }) {
                continue;
            }
            match bench::run_case(&gpu, case, dtype, 10) {
                Ok(r) => bench::print_case(&r),
                Err(e) => println!("{case:?}: {e}"),
            }
        }
    }
}
