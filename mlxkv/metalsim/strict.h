// The strict front end's view of Metal: declarations only, for a syntax-only pass with
// clang (C++14, no exceptions, no RTTI, VLAs as errors) over the source MLX would give
// Apple's compiler. It rejects what the permissive simulator shim (shim.h) accepts:
//   - address spaces are types (device = 1, constant = 2, threadgroup = 3, thread =
//     the default), so a `const device T*` parameter refuses a `constant` argument;
//   - no C++ standard library (`std::` is undeclared), no `double`, no `new`/`delete`,
//     no `malloc`;
//   - MLX's prelude (metal::utils(), put before every custom kernel) is declared here,
//     so a kernel redefining one of its names fails as it would on a Mac.
// Declarations follow the Metal Shading Language specification; nothing here runs.

#include "msl_math.h"

#define device __attribute__((address_space(1)))
#define constant __attribute__((address_space(2)))
#define threadgroup __attribute__((address_space(3)))
#define thread

typedef __SIZE_TYPE__ size_t;
typedef __PTRDIFF_TYPE__ ptrdiff_t;
typedef signed char int8_t;
typedef short int16_t;
typedef int int32_t;
typedef long long int64_t;
typedef unsigned char uint8_t;
typedef unsigned short uint16_t;
typedef unsigned int uint32_t;
typedef unsigned long long uint64_t;
typedef unsigned int uint;
typedef unsigned short ushort;
typedef unsigned char uchar;

// half is the Mac's own _Float16 (the pass targets arm64). clang cannot give a class
// type an address space's conversions, so bfloat is _Float16 here too: bfloat's stricter
// conversion rules are not checked.
typedef _Float16 half;
typedef half float16_t;
typedef _Float16 bfloat;

#define MLXKV_VECTORS(T, name)                                 \
  typedef T name##2 __attribute__((ext_vector_type(2)));      \
  typedef T name##3 __attribute__((ext_vector_type(3)));      \
  typedef T name##4 __attribute__((ext_vector_type(4)));
MLXKV_VECTORS(float, float)
MLXKV_VECTORS(int, int)
MLXKV_VECTORS(unsigned int, uint)
MLXKV_VECTORS(short, short)
MLXKV_VECTORS(unsigned short, ushort)
MLXKV_VECTORS(char, char)
MLXKV_VECTORS(unsigned char, uchar)
#undef MLXKV_VECTORS

#define INFINITY __builtin_inff()
#define NAN __builtin_nanf("")
#define FLT_MAX 3.40282347e+38F
#define FLT_MIN 1.17549435e-38F

namespace metal {
enum class mem_flags { mem_none = 0, mem_device = 1, mem_threadgroup = 2, mem_texture = 4 };
mem_flags operator|(mem_flags a, mem_flags b);
void threadgroup_barrier(mem_flags);
void simdgroup_barrier(mem_flags);

template <class T>
struct numeric_limits {
  static constexpr T min();
  static constexpr T max();
  static constexpr T lowest();
  static constexpr T infinity();
  static constexpr T quiet_NaN();
  static constexpr T epsilon();
};
template <class To, class From>
To as_type(From);

#define MLXKV_UNARY(name, builtin) \
  float name(float);               \
  half name(half);
#define MLXKV_MATH                                                                        \
  MLXKV_MSL_UNARY_FUNCTIONS(MLXKV_UNARY)                                                  \
  float pow(float, float); float powr(float, float); float fma(float, float, float);     \
  float fmax(float, float); float fmin(float, float); float precise_divide(float, float);
MLXKV_MATH
namespace fast {
MLXKV_MATH
}
namespace precise {
MLXKV_MATH
}
#undef MLXKV_MATH
#undef MLXKV_UNARY

#define MLXKV_MINMAX(T)    \
  T max(T, T);             \
  T min(T, T);             \
  T clamp(T, T, T);        \
  T abs(T);
MLXKV_MINMAX(float)
MLXKV_MINMAX(half)
MLXKV_MINMAX(int)
MLXKV_MINMAX(uint)
MLXKV_MINMAX(short)
MLXKV_MINMAX(ushort)
MLXKV_MINMAX(int64_t)
MLXKV_MINMAX(uint64_t)
#undef MLXKV_MINMAX
bool isnan(float);
bool isinf(float);
bool isfinite(float);
int popcount(uint);
uint clz(uint);
uint ctz(uint);
template <class T>
T select(T, T, bool);

// simdgroup and quadgroup functions (values are passed by value: any MSL scalar)
template <class T> T simd_sum(T);
template <class T> T simd_max(T);
template <class T> T simd_min(T);
template <class T> T simd_product(T);
template <class T> T simd_and(T);
template <class T> T simd_or(T);
template <class T> T simd_xor(T);
template <class T> T simd_prefix_inclusive_sum(T);
template <class T> T simd_prefix_exclusive_sum(T);
template <class T> T simd_prefix_inclusive_product(T);
template <class T> T simd_prefix_exclusive_product(T);
template <class T> T simd_shuffle(T, ushort);
template <class T> T simd_shuffle_xor(T, ushort);
template <class T> T simd_shuffle_down(T, ushort);
template <class T> T simd_shuffle_up(T, ushort);
template <class T> T simd_broadcast(T, ushort);
template <class T> T simd_broadcast_first(T);
bool simd_all(bool);
bool simd_any(bool);
template <class T> T quad_sum(T);
template <class T> T quad_max(T);
template <class T> T quad_min(T);
template <class T> T quad_shuffle(T, ushort);
template <class T> T quad_shuffle_xor(T, ushort);
template <class T> T quad_broadcast(T, ushort);

// atomics (the pointer's address space is part of the deduced type)
enum memory_order { memory_order_relaxed };
template <class T>
struct atomic {
  T value;
};
typedef atomic<float> atomic_float;
typedef atomic<int> atomic_int;
typedef atomic<uint> atomic_uint;
template <class A, class T> T atomic_fetch_add_explicit(A*, T, memory_order);
template <class A, class T> T atomic_fetch_sub_explicit(A*, T, memory_order);
template <class A, class T> T atomic_fetch_max_explicit(A*, T, memory_order);
template <class A, class T> T atomic_fetch_min_explicit(A*, T, memory_order);
template <class A, class T> T atomic_fetch_or_explicit(A*, T, memory_order);
template <class A, class T> T atomic_fetch_and_explicit(A*, T, memory_order);
template <class A, class T> T atomic_exchange_explicit(A*, T, memory_order);
template <class A, class T> void atomic_store_explicit(A*, T, memory_order);
template <class A> auto atomic_load_explicit(A* p, memory_order) -> decltype(p->value);
template <class A, class T>
bool atomic_compare_exchange_weak_explicit(A*, thread T*, T, memory_order, memory_order);
}  // namespace metal

using namespace metal;

// ----- MLX's prelude (mlx/backend/metal/kernels/utils.h and what it includes) -----------
typedef bfloat bfloat16_t;
uint16_t bfloat16_to_uint16(const bfloat16_t x);
bfloat16_t uint16_to_bfloat16(const uint16_t x);
struct complex64_t {
  float real;
  float imag;
};
template <typename U>
struct Limits {
  static const constant U max;
  static const constant U min;
  static const constant U finite_max;
  static const constant U finite_min;
};
inline size_t elem_to_loc(uint elem, device const int* shape, device const int64_t* strides, int ndim) {
  return 0;
}
inline size_t elem_to_loc(uint elem, constant const int* shape, constant const int64_t* strides, int ndim) {
  return 0;
}
inline size_t elem_to_loc_1(uint elem, constant const int64_t& stride) { return 0; }
inline size_t elem_to_loc_2(uint2 elem, constant const int64_t* strides) { return 0; }
inline size_t elem_to_loc_3(uint3 elem, constant const int64_t* strides) { return 0; }
inline size_t ceildiv(size_t N, size_t M) { return 0; }
inline float log1p(float x) { return x; }
inline uint64_t simd_shuffle_down(uint64_t data, uint16_t delta) { return data; }
inline int64_t simd_shuffle_down(int64_t data, uint16_t delta) { return data; }
inline bool simd_shuffle_down(bool data, uint16_t delta) { return data; }
#define MLX_MTL_CONST static constant constexpr const
#define MLX_MTL_PRAGMA_UNROLL _Pragma("clang loop unroll(full)")
#define MLX_MTL_LOOP_UNROLL _Pragma("clang loop unroll(full)")

namespace mlxkv_strict {
// A kernel-scope `threadgroup T name[N];` is rewritten to a reference from here (clang
// refuses address-space-qualified automatic variables; Metal allows them at kernel
// scope only, so any left in a helper is an error, as on a Mac).
template <class T>
threadgroup T& tg_alloc(int tag);
constexpr size_t max_threadgroup_bytes = 32768;
}  // namespace mlxkv_strict

// Not in MSL: each of these fails with its name in the message.
#define double mlxkv_strict_double_is_not_supported_in_Metal
#define new mlxkv_strict_new_is_not_supported_in_Metal
#define delete mlxkv_strict_delete_is_not_supported_in_Metal
#define malloc mlxkv_strict_malloc_is_not_supported_in_Metal
#define free mlxkv_strict_free_is_not_supported_in_Metal
#define printf mlxkv_strict_printf_is_not_supported_in_Metal
