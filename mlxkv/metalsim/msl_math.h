// The unary MSL math functions the simulator knows, in one list for both of its views of
// Metal: shim.h defines each (in metal::, metal::fast::, metal::precise::) on the C
// builtin named here, strict.h declares the same names. X(name, builtin) per function.
#define MLXKV_MSL_UNARY_FUNCTIONS(X) \
  X(exp, __builtin_expf)             \
  X(exp2, __builtin_exp2f)           \
  X(log, __builtin_logf)             \
  X(log2, __builtin_log2f)           \
  X(sqrt, __builtin_sqrtf)           \
  X(rsqrt, 1.0f / __builtin_sqrtf)   \
  X(tanh, __builtin_tanhf)           \
  X(sin, __builtin_sinf)             \
  X(cos, __builtin_cosf)             \
  X(floor, __builtin_floorf)         \
  X(ceil, __builtin_ceilf)           \
  X(round, __builtin_roundf)         \
  X(rint, __builtin_rintf)           \
  X(trunc, __builtin_truncf)         \
  X(fabs, __builtin_fabsf)
