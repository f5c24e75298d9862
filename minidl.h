#pragma once
// The public API of minidl in one include.
#include "autograd/gradcheck.h"
#include "autograd/grad_mode.h"
#include "autograd/tape.h"
#include "core/allocator.h"
#include "core/device.h"
#include "core/dtype.h"
#include "core/error.h"
#include "core/generator.h"
#include "core/tensor.h"
#include "ops/ops.h"
