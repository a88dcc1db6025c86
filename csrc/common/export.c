/* The shared library's own translation unit: its exported symbols all come
 * from the static core (linked whole), so this file only anchors the target. */
#include "moe_fused.h"
