#![cfg(feature = "emulate")]
use fep_kernels::Device;
use fep_kernels::lca::{Dictionary, LcaSpec, Threshold};

#[test]
fn smoke() {
    let (n, m, batch) = (7usize, 65usize, 3usize);
    let mut s = 1u64;
    let mut r = || {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((s >> 40) as f32) / (1u64 << 24) as f32 - 0.5
    };
    let mut phi: Vec<f32> = (0..n * m).map(|_| r()).collect();
    for j in 0..m {
        let nr = (0..n).map(|i| phi[i * m + j].powi(2)).sum::<f32>().sqrt();
        (0..n).for_each(|i| phi[i * m + j] /= nr);
    }
    let x: Vec<f32> = (0..batch * n).map(|_| r() * 4.0).collect();
    for (warp, smem) in [(32, 65536), (64, 65536), (32, 512), (64, 512)] {
        let spec = LcaSpec::new(0.3)
            .eta(0.05)
            .steps(30)
            .threshold(Threshold::Soft)
            .trace(true);
        let cpu = Device::cpu();
        let d =
            Dictionary::new(&cpu.upload(&phi).unwrap().view(), n, m, Default::default()).unwrap();
        let want = d
            .solve(&spec, &cpu.upload(&x).unwrap().view(), None)
            .unwrap();
        let emu = Device::emulated(warp, smem).unwrap();
        let de =
            Dictionary::new(&emu.upload(&phi).unwrap().view(), n, m, Default::default()).unwrap();
        let t = std::time::Instant::now();
        let got = de
            .solve(&spec, &emu.upload(&x).unwrap().view(), None)
            .unwrap();
        let (a0, a1) = (want.a.to_vec().unwrap(), got.a.to_vec().unwrap());
        let (e0, e1) = (
            want.energy.unwrap().to_vec().unwrap(),
            got.energy.unwrap().to_vec().unwrap(),
        );
        let err = a0
            .iter()
            .zip(&a1)
            .map(|(p, q)| (p - q).abs())
            .fold(0f32, f32::max);
        let eerr = e0
            .iter()
            .zip(&e1)
            .map(|(p, q)| (p - q).abs())
            .fold(0f32, f32::max);
        println!(
            "warp {warp} smem {smem}: max|da| {err:e} max|de| {eerr:e} nnz {} steps {:?} in {:?}",
            a1.iter().filter(|v| **v != 0.0).count(),
            got.steps.to_vec().unwrap(),
            t.elapsed()
        );
        assert!(err < 1e-4 && eerr < 1e-3);
    }
}
