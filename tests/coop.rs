//! Pins wgpu 30's cooperative-matrix load semantics, which the tensor-core
//! kernels rely on: `coopLoadT` reads a row-major tile (stride = elements
//! between rows), `coopLoad` a column-major one (stride = elements between
//! columns), `coopStoreT` writes row-major. Runs on adapters with an 8×8 or
//! 16×16 f16 → f32 configuration (Mesa 26's lavapipe, tensor-core GPUs);
//! elsewhere it says so, and fails under `SD3_REQUIRE=coop`.

mod common;

use sd3_wgpu::target::Feature;
use wgpu::util::DeviceExt;

fn probe_source(f: u32, load_b: &str) -> String {
    format!(
        "enable f16;
enable wgpu_cooperative_matrix;
@group(0) @binding(0) var<storage, read> a: array<f16>;
@group(0) @binding(1) var<storage, read> b: array<f16>;
@group(0) @binding(2) var<storage, read_write> c: array<f32>;
fn store(acc: coop_mat{f}x{f}<f32, C>, stride: u32) {{
    coopStoreT(acc, &c[0], stride);
}}
@compute @workgroup_size(64)
fn main() {{
    // A row-major with row stride SA; B by LOAD_B with stride SB.
    let ma = coopLoadT<coop_mat{f}x{f}<f16, A>>(&a[OFF_A], SA);
    let mb = {load_b}<coop_mat{f}x{f}<f16, B>>(&b[OFF_B], SB);
    var acc = coop_mat{f}x{f}<f32, C>();
    acc = coopMultiplyAdd(ma, mb, acc);
    store(acc, SC);
}}
"
    )
}

#[test]
fn coop_load_layouts_and_strides_are_as_the_kernels_assume() {
    let gpu = common::gpu();
    let t = gpu.target();
    let size = [16u32, 8].into_iter().find(|&f| {
        t.coop
            .iter()
            .any(|c| c.m == f && c.n == f && c.k == f && c.ab == "f16" && c.c == "f32")
    });
    let Some(f) = size else {
        assert!(
            !common::required().contains(&Feature::Coop),
            "SD3_REQUIRE demands coop but the adapter has no f16 → f32 fragment configuration"
        );
        eprintln!("skipped: the adapter has no cooperative-matrix f16 → f32 configuration");
        return;
    };
    // B column-major (GEMM weights, attention keys), then row-major
    // (attention values).
    probe(gpu, f, false);
    probe(gpu, f, true);
}

fn probe(gpu: &sd3_wgpu::gpu::Gpu, f: u32, b_row_major: bool) {
    let n = f as usize;
    // Padded strides and offsets, so a stride or layout mix-up cannot pass.
    let (sa, sb, sc, off_a, off_b) = (n + 3, n + 5, n + 2, 7usize, 11usize);
    // Small integers: every product and sum is exact in f16 and f32.
    let a: Vec<f32> = (0..off_a + n * sa)
        .map(|i| ((i * 7) % 5) as f32 - 2.0)
        .collect();
    let b: Vec<f32> = (0..off_b + n * sb)
        .map(|i| ((i * 3) % 7) as f32 - 3.0)
        .collect();
    let load_b = if b_row_major { "coopLoadT" } else { "coopLoad" };
    let src = probe_source(f, load_b)
        .replace("OFF_A", &format!("{off_a}u"))
        .replace("OFF_B", &format!("{off_b}u"))
        .replace("SA", &format!("{sa}u"))
        .replace("SB", &format!("{sb}u"))
        .replace("SC", &format!("{sc}u"));
    let dev = &gpu.device;
    let buf = |data: &[f32]| {
        let h: Vec<half::f16> = data.iter().map(|&v| half::f16::from_f32(v)).collect();
        let mut bytes = bytemuck::cast_slice(&h).to_vec();
        bytes.resize(bytes.len().div_ceil(4) * 4, 0);
        dev.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: None,
            contents: &bytes,
            usage: wgpu::BufferUsages::STORAGE,
        })
    };
    let (ba, bb) = (buf(&a), buf(&b));
    let out_len = n * sc;
    let bc = dev.create_buffer(&wgpu::BufferDescriptor {
        label: None,
        size: (out_len * 4) as u64,
        usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC,
        mapped_at_creation: false,
    });
    let module = dev.create_shader_module(wgpu::ShaderModuleDescriptor {
        label: Some("coop probe"),
        source: wgpu::ShaderSource::Wgsl(src.into()),
    });
    let pipeline = dev.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
        label: None,
        layout: None,
        module: &module,
        entry_point: Some("main"),
        compilation_options: Default::default(),
        cache: None,
    });
    let bg = dev.create_bind_group(&wgpu::BindGroupDescriptor {
        label: None,
        layout: &pipeline.get_bind_group_layout(0),
        entries: &[
            wgpu::BindGroupEntry {
                binding: 0,
                resource: ba.as_entire_binding(),
            },
            wgpu::BindGroupEntry {
                binding: 1,
                resource: bb.as_entire_binding(),
            },
            wgpu::BindGroupEntry {
                binding: 2,
                resource: bc.as_entire_binding(),
            },
        ],
    });
    let mut enc = dev.create_command_encoder(&Default::default());
    {
        let mut pass = enc.begin_compute_pass(&Default::default());
        pass.set_pipeline(&pipeline);
        pass.set_bind_group(0, &bg, &[]);
        pass.dispatch_workgroups(1, 1, 1);
    }
    gpu.submit_and_wait("coop probe", enc.finish()).unwrap();
    let got: Vec<f32> =
        bytemuck::pod_collect_to_vec(&gpu.read_bytes(&bc, (out_len * 4) as u64).unwrap());
    for i in 0..n {
        for j in 0..n {
            // A[i][k] row-major at off_a + i·sa + k; B[k][j] column-major at
            // off_b + j·sb + k, or row-major at off_b + k·sb + j.
            let bk = |k: usize| {
                if b_row_major {
                    b[off_b + k * sb + j]
                } else {
                    b[off_b + j * sb + k]
                }
            };
            let want: f32 = (0..n).map(|k| a[off_a + i * sa + k] * bk(k)).sum();
            assert_eq!(
                got[i * sc + j],
                want,
                "C[{i}][{j}] ({f}×{f} fragments, B by {load_b})"
            );
        }
    }
    eprintln!("coop {f}×{f}: row-major A, B by {load_b}, row-major C as assumed");
}
