// Everything the per-ISA kernel translation units include, gathered so that each of them can
// include it BEFORE switching the target ISA: shared inline and template code (ATen, c10,
// libstdc++) is then compiled for the baseline ISA in every TU, and only bnext's own
// ISA-namespaced code is compiled for AVX2/AVX-512.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <bit>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>
#include <numeric>
#include <type_traits>

#if defined(__x86_64__)
#include <immintrin.h>  // streaming stores; the intrinsics are usable under each TU's target pragma
#endif

#include "../common/act.h"
#include "../common/layout.h"
#include "../common/math.h"
#include "kernels.h"
