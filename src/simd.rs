//! `simd_fn!`: one element-wise kernel of the fast CPU path compiled per instruction set and
//! picked at run time (multiversion): AVX-512 where the compiler has it stable (rustc >= 1.89,
//! `fep_avx512` from build.rs), AVX2+FMA and NEON everywhere, the baseline otherwise. The one
//! place the target list lives.

macro_rules! simd_fn {
    ($($item:tt)*) => {
        #[cfg_attr(
            fep_avx512,
            multiversion::multiversion(targets(
                "x86_64+avx512f+avx512bw+avx512vl+avx2+fma",
                "x86_64+avx2+fma",
                "aarch64+neon"
            ))
        )]
        #[cfg_attr(
            not(fep_avx512),
            multiversion::multiversion(targets("x86_64+avx2+fma", "aarch64+neon"))
        )]
        $($item)*
    };
}
