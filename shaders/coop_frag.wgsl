// The cooperative-matrix fragment types of the tensor-core kernels: F×F
// fragments, f16 inputs, f32 accumulation; F = 16 with COOP16 (the
// adapter offers 16×16×16), else 8.

#if COOP16
alias FragA = coop_mat16x16<f16, A>;
alias FragB = coop_mat16x16<f16, B>;
alias FragC = coop_mat16x16<f32, C>;
const F: u32 = 16u;
#else
alias FragA = coop_mat8x8<f16, A>;
alias FragB = coop_mat8x8<f16, B>;
alias FragC = coop_mat8x8<f32, C>;
const F: u32 = 8u;
#endif
