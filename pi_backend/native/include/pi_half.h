/*
 * pi_half.h -- IEEE half <-> float in plain integer operations: the one definition shared by the CPU
 * kernels (cpu/kernels.h), the device kernels' own rounding (cuda/pi_kernels.cu, CUDA and HIP) and their
 * CPU emulator (cuda/gpu_emu.h), so that every path writes the same bits. Rounding is to nearest even,
 * as F16C's vcvtps2ph and PTX's cvt.rn.f16.f32 round (and numpy's astype(float16)); a NaN stays a NaN,
 * quiet, with its top payload bits, as vcvtps2ph keeps it.
 */
#ifndef PI_HALF_H
#define PI_HALF_H

#include <stdint.h>
#include <string.h>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define PI_HALF_FN static __host__ __device__ __forceinline__
#else
#define PI_HALF_FN static inline
#endif

PI_HALF_FN float pi_fp16_to_fp32(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu, bits;
    if (exp == 0x1fu) {
        bits = sign | 0x7f800000u | (mant << 13);
    } else if (exp == 0) {
        if (mant == 0) {
            bits = sign;
        } else { /* subnormal: normalise */
            int e = -1;
            do { mant <<= 1; e++; } while (!(mant & 0x400u));
            bits = sign | ((uint32_t)(127 - 15 - e) << 23) | ((mant & 0x3ffu) << 13);
        }
    } else {
        bits = sign | ((exp + (127 - 15)) << 23) | (mant << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

PI_HALF_FN uint16_t pi_fp32_to_fp16(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    const uint16_t sign = (uint16_t)((x >> 16) & 0x8000u);
    const uint32_t ax = x & 0x7fffffffu;
    if (ax > 0x7f800000u) return (uint16_t)(sign | 0x7e00u | ((ax >> 13) & 0x3ffu)); /* NaN, quiet */
    if (ax >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u);                         /* >= 65520: inf */
    if (ax >= 0x38800000u) {                                                          /* normal (>= 2^-14) */
        const uint32_t r = ax + 0xfffu + ((ax >> 13) & 1u); /* round to nearest even at bit 13 */
        return (uint16_t)(sign | ((r - 0x38000000u) >> 13)); /* rebias 127 -> 15 */
    }
    if (ax <= 0x33000000u) return sign; /* <= 2^-25 rounds to 0 */
    /* subnormal half: round(|f| / 2^-24) with |f| = m * 2^(e - 150); may carry into the smallest normal */
    const uint32_t e = ax >> 23, m = (ax & 0x7fffffu) | 0x800000u, sh = 126 - e; /* 14 .. 24 */
    const uint32_t q = m >> sh, rem = m & ((1u << sh) - 1), halfway = 1u << (sh - 1);
    return (uint16_t)(sign | (q + (rem > halfway || (rem == halfway && (q & 1u)))));
}

#endif /* PI_HALF_H */
