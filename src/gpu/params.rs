//! One source for a kernel's params: a `#[repr(C)]` Rust struct declared with
//! [`params_struct!`] also yields its field list (name, byte offset, WGSL
//! scalar type), which `tests/portability.rs` compares field by field with
//! naga's reading of the WGSL `struct Params` — so a field renamed, moved or
//! retyped on one side only fails a test instead of feeding a kernel the
//! wrong numbers.

/// The WGSL scalar type of a params field.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scalar {
    /// `u32`
    U32,
    /// `i32`
    I32,
    /// `f32`
    F32,
}

/// Rust types that may appear in a params struct: scalars and arrays of them.
pub trait ParamScalar {
    /// Its WGSL scalar type.
    const SCALAR: Scalar;
    /// How many scalars (1, or an array's length).
    const LEN: usize = 1;
}

impl<T: ParamScalar, const N: usize> ParamScalar for [T; N] {
    const SCALAR: Scalar = T::SCALAR;
    const LEN: usize = N;
}

impl ParamScalar for u32 {
    const SCALAR: Scalar = Scalar::U32;
}
impl ParamScalar for i32 {
    const SCALAR: Scalar = Scalar::I32;
}
impl ParamScalar for f32 {
    const SCALAR: Scalar = Scalar::F32;
}

/// One field of a params struct.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Field {
    /// The name, the same on both sides.
    pub name: &'static str,
    /// Byte offset.
    pub offset: usize,
    /// Scalar type.
    pub ty: Scalar,
    /// Scalars in the field (1, or an array's length; WGSL vectors and
    /// arrays of vectors count their scalars).
    pub len: usize,
}

/// A params struct's layout: its size and fields in order.
#[derive(Clone, Copy, Debug)]
pub struct ParamsLayout {
    /// Size in bytes.
    pub size: usize,
    /// The fields, in declaration order.
    pub fields: &'static [Field],
}

/// Declares a kernel's params: a `#[repr(C)]`, `Pod` struct of `u32`/`i32`/`f32`
/// fields, and its [`ParamsLayout`] as the associated constant `LAYOUT`.
#[macro_export]
macro_rules! params_struct {
    (
        $(#[$meta:meta])*
        pub struct $name:ident {
            $( $(#[$fmeta:meta])* pub $field:ident : $ty:ty ),* $(,)?
        }
    ) => {
        $(#[$meta])*
        #[repr(C)]
        #[derive(Clone, Copy, Debug, Default, bytemuck::Pod, bytemuck::Zeroable)]
        pub struct $name {
            $( $(#[$fmeta])* pub $field: $ty ),*
        }

        impl $name {
            /// The layout the WGSL `struct Params` must have.
            pub const LAYOUT: $crate::gpu::ParamsLayout = $crate::gpu::ParamsLayout {
                size: std::mem::size_of::<$name>(),
                fields: &[
                    $( $crate::gpu::Field {
                        name: stringify!($field),
                        offset: std::mem::offset_of!($name, $field),
                        ty: <$ty as $crate::gpu::ParamScalar>::SCALAR,
                        len: <$ty as $crate::gpu::ParamScalar>::LEN,
                    } ),*
                ],
            };
        }
    };
}
