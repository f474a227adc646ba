/* Fuzz target: virtqueue parsing and the console's data and control paths,
 * starting from a running driver with the multiport handshake done. */
#define FUZZ_SETUP_LEVEL 2
#include "harness.h"
