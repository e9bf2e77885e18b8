/* Private helpers of the CPU backend. */
#ifndef DD_CPU_INTERNAL_H
#define DD_CPU_INTERNAL_H
#include "../decdec.h"

/* Hot loops get an AVX2/FMA clone picked at load time (GCC function multiversioning), so a
 * portable wheel still runs wide vectors; never -march=native. */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define DD_HOT __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define DD_HOT
#endif


/* Dequantize output row o of the base weight into w[d_in_pad] (fp32). */
DD_HOT void dd_cpu_dequant_row(const dd_shape *s, const uint8_t *qweight, const uint16_t *scales,
                        const uint16_t *zeros, int32_t o, float *w);
#endif
