//! A small candle model with Student-t attention: x `[B, L, E]` → linear q, k, v projections →
//! heads `[B, H, L, Dh]` (a transposed view, no copy) → causal Student-t attention with a learned
//! per-key precision → output projection. Runs on candle's CPU device.
//!
//! `cargo run --example candle_student_t --features candle`

use candle_core::{D, DType, Device, Module, Result, Tensor};
use fep_kernels::attention::{AttentionSpec, Score};

/// y = x Wᵀ + b.
struct Linear {
    w: Tensor,
    b: Tensor,
}

impl Linear {
    fn new(inp: usize, out: usize, dev: &Device) -> Result<Self> {
        let std = 1.0 / (inp as f64).sqrt();
        Ok(Linear {
            w: Tensor::randn(0f32, std as f32, (out, inp), dev)?,
            b: Tensor::zeros(out, DType::F32, dev)?,
        })
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.broadcast_matmul(&self.w.t()?)?.broadcast_add(&self.b)
    }
}

/// Multi-head Student-t self-attention with a per-key precision π_j = softplus(x_j · u_h).
struct StudentTAttention {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    precision: Linear,
    heads: usize,
    spec: AttentionSpec,
}

impl StudentTAttention {
    fn new(embed: usize, heads: usize, nu: f32, dev: &Device) -> Result<Self> {
        Ok(StudentTAttention {
            q: Linear::new(embed, embed, dev)?,
            k: Linear::new(embed, embed, dev)?,
            v: Linear::new(embed, embed, dev)?,
            o: Linear::new(embed, embed, dev)?,
            precision: Linear::new(embed, heads, dev)?,
            heads,
            spec: AttentionSpec::new(Score::StudentT(nu)).causal(true),
        })
    }
}

impl Module for StudentTAttention {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, l, e) = x.dims3()?;
        let dh = e / self.heads;
        // [B, L, E] -> [B, L, H, Dh] -> [B, H, L, Dh]: a strided view the op reads in place.
        let split = |t: Tensor| t.reshape((b, l, self.heads, dh))?.transpose(1, 2);
        let q = split(self.q.forward(x)?)?;
        let k = split(self.k.forward(x)?)?;
        let v = split(self.v.forward(x)?)?;
        // π [B, H, L] = softplus(·) + 1e-3 (> 0).
        let pi = self.precision.forward(x)?.transpose(1, 2)?;
        let pi = ((pi.exp()? + 1.0)?.log()? + 1e-3)?;
        let o = fep_kernels::candle::attention(&q, &k, &v, &self.spec, Some(&pi))?;
        // [B, H, L, Dh] -> [B, L, E].
        let o = o.transpose(1, 2)?.reshape((b, l, e))?;
        self.o.forward(&o)
    }
}

fn main() -> Result<()> {
    let dev = Device::Cpu;
    let (batch, len, embed, heads) = (2, 16, 64, 2);
    let model = StudentTAttention::new(embed, heads, 3.0, &dev)?;
    let x = Tensor::randn(0f32, 1.0, (batch, len, embed), &dev)?;
    let y = model.forward(&x)?;
    println!("input  {:?}", x.shape());
    println!("output {:?}", y.shape());
    println!(
        "y[0, 0, ..4] = {:?}",
        y.get(0)?
            .get(0)?
            .narrow(D::Minus1, 0, 4)?
            .to_vec1::<f32>()?
    );
    Ok(())
}
