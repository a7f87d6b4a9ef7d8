//! The sampler's schedule and noise against diffusers and torch.
// The expected values are printed by Python at full f64 precision, exactly as diffusers gives them.
#![allow(clippy::excessive_precision)]

use std::path::PathBuf;

use sd3_wgpu::sampler::{guide, noise, FlowMatchEuler, Rng};
use sd3_wgpu::weights::Checkpoint;

#[test]
fn torch_randn_is_reproduced_on_both_sides_of_16() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/rng.safetensors");
    let ck = Checkpoint::open(&[path]).unwrap();
    assert!(ck.tensors.len() >= 8);
    for name in ck.tensors.keys() {
        let parts: Vec<&str> = name.split('.').collect();
        let (seed, n): (u64, usize) = (parts[1].parse().unwrap(), parts[2].parse().unwrap());
        let (_, want) = ck.read_f32(name).unwrap();
        let got = noise(Rng::Torch, seed, n);
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            // torch may use SLEEF's vectorised log/sin/cos: allow an ulp or two.
            assert!(
                (g - w).abs() <= 2e-6 * w.abs().max(1.0),
                "{name}[{i}]: {g} vs {w}"
            );
        }
        assert_eq!(got.len(), want.len());
    }
}

#[test]
fn native_noise_is_standard_normal_and_seeded() {
    let a = noise(Rng::Native, 1, 100_000);
    assert_eq!(a, noise(Rng::Native, 1, 100_000));
    assert_ne!(a[..8], noise(Rng::Native, 2, 8)[..]);
    let mean = a.iter().map(|&x| x as f64).sum::<f64>() / a.len() as f64;
    let var = a.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / a.len() as f64;
    assert!(
        mean.abs() < 0.02 && (var - 1.0).abs() < 0.02,
        "mean {mean}, var {var}"
    );
}

#[test]
fn schedule_matches_diffusers() {
    // diffusers: FlowMatchEulerDiscreteScheduler(shift=3.0).set_timesteps(4)
    let s = FlowMatchEuler::new(4, 3.0);
    // (values printed by diffusers 0.42; note the end point is shifted twice)
    assert_eq!(
        s.timesteps,
        vec![
            1000.0,
            857.6923217773438,
            602.1505737304688,
            8.928571701049805
        ]
    );
    assert_eq!(
        s.sigmas[..4],
        [
            1.0,
            0.857692301273346,
            0.602150559425354,
            0.008928571827709675
        ]
    );
    let s28 = FlowMatchEuler::new(28, 3.0);
    assert_eq!(
        s28.timesteps[..4],
        [
            1000.0,
            987.380615234375,
            974.1077270507812,
            960.1293334960938
        ]
    );
    assert_eq!(
        s28.timesteps[25..],
        [199.8269805908203, 110.90573120117188, 8.928571701049805]
    );
    assert_eq!(s.sigmas.len(), 5);
    assert_eq!(*s.sigmas.last().unwrap(), 0.0);
    assert_eq!(s.start_for_strength(0.5), 2);
    assert_eq!(s.start_for_strength(1.0), 0);
    let mut x = vec![1.0f32; 3];
    s.step(0, &mut x, &[1.0, 2.0, 0.0]);
    let dt = s.sigmas[1] - s.sigmas[0];
    assert_eq!(x, vec![1.0 + dt, 1.0 + 2.0 * dt, 1.0]);
    assert_eq!(guide(&[1.0], &[3.0], 5.0), vec![11.0]);
}
