# The device library, for inclusion by native/vmm/Makefile:
#   include devices/devices.mk
#   clade-vmm: ... $(DEVICES_SRCS)    (and -I$(DEVICES_DIR) in CFLAGS)
# It needs only libc and the Linux uapi headers.
DEVICES_DIR := $(patsubst %/,%,$(dir $(lastword $(MAKEFILE_LIST))))
DEVICES_SRCS := $(addprefix $(DEVICES_DIR)/,guest_mem.c pci.c virtq.c virtio_pci.c virtio_console.c virtio_blk.c virtio_net.c uart8250.c cmos.c)
DEVICES_HDRS := $(addprefix $(DEVICES_DIR)/,guest_mem.h pci.h virtq.h virtio_pci.h virtio_console.h virtio_blk.h virtio_net.h uart8250.h cmos.h)
