/* Fuzz target: PCI configuration (0xCF8/0xCFC), BAR registers over MMIO,
 * virtio-pci setup and the UART, starting from a device nobody has touched. */
#define FUZZ_SETUP_LEVEL 0
#include "harness.h"
