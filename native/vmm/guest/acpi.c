/*
 * Minimal ACPI tables for the Linux guest: RSDP -> XSDT -> FADT (+ an empty
 * DSDT) and MADT. Written from the ACPI specification's table layouts.
 *
 * Why ACPI at all: the guest kernel is built without MP-table support
 * (CONFIG_X86_MPPARSE unset), and with acpi=off it finds no local APIC and
 * runs in PIC mode, where MSI-X (and so virtio-pci) is refused. A MADT that
 * lists the boot CPU's LAPIC and KVM's in-kernel IOAPIC is what enables both.
 *
 * The FADT declares a hardware-reduced ACPI platform (no SCI, no PM timer,
 * no fixed-hardware registers) with a reset register at port 0xcf9, which
 * the VMM treats as a reboot request. There is no PCI root bridge object, so
 * bus 0 is found by the legacy peer-bus scan instead (pci=lastbus=1 on the
 * command line, added by the VMM).
 *
 * On a hardware-reduced platform Linux assumes no legacy PIC and so no ISA
 * IRQs: IRQ numbers 0-15 are not mapped to IOAPIC pins, and the serial driver's
 * built-in port at 0x3f8 asks for IRQ 4, which does not exist; opening ttyS0
 * then fails and writes give EIO. The DSDT therefore describes the UART as an
 * ACPI device (PNP0501) with its I/O range and IRQ; the kernel's PNP serial
 * driver takes over the port and maps GSI 4 (IOAPIC pin 4, which the VMM
 * raises) to an IRQ of its own.
 */
#include "../vmm.h"

#include <string.h>

#define TABLES_GPA 0xe0000ull /* inside the ISA hole the kernel keeps reserved */
#define RSDP_OFF 0x000
#define XSDT_OFF 0x040
#define FADT_OFF 0x100
#define DSDT_OFF 0x240
#define MADT_OFF 0x300
#define TABLES_SIZE 0x400
#define HEADER_LEN 36
#define FADT_LEN 276
#define FADT_HW_REDUCED (1u << 20)
#define FADT_RESET_REG_SUP (1u << 10)
#define IAPC_VGA_NOT_PRESENT 0x4
#define MADT_PCAT_COMPAT 1u
#define LAPIC_GPA 0xfee00000u
#define IOAPIC_GPA 0xfec00000u
#define RESET_PORT 0xcf9
#define RESET_VALUE 0x06

static void put_u8(uint8_t *p, size_t off, uint8_t v) { p[off] = v; }
static void put_u16(uint8_t *p, size_t off, uint16_t v) { memcpy(p + off, &v, 2); }
static void put_u32(uint8_t *p, size_t off, uint32_t v) { memcpy(p + off, &v, 4); }
static void put_u64(uint8_t *p, size_t off, uint64_t v) { memcpy(p + off, &v, 8); }

static uint8_t checksum(const uint8_t *p, size_t len) {
    uint8_t sum = 0;
    for (size_t i = 0; i < len; i++) sum = (uint8_t)(sum + p[i]);
    return (uint8_t)(0 - sum);
}

static void header(uint8_t *t, const char *sig, uint32_t len, uint8_t revision) {
    memcpy(t, sig, 4);
    put_u32(t, 4, len);
    put_u8(t, 8, revision);
    memcpy(t + 10, "CLADE ", 6);
    memcpy(t + 16, "CLADEVMM", 8);
    put_u32(t, 24, 1);
    memcpy(t + 28, "CLAD", 4);
    put_u32(t, 32, 1);
}

static void seal(uint8_t *t) {
    uint32_t len;
    memcpy(&len, t + 4, 4);
    t[9] = 0;
    t[9] = checksum(t, len);
}

/* Generic address structure: one byte in I/O space. */
static void io_byte_gas(uint8_t *p, size_t off, uint16_t port) {
    put_u8(p, off, 1);     /* system I/O */
    put_u8(p, off + 1, 8); /* bit width */
    put_u8(p, off + 3, 1); /* byte access */
    put_u64(p, off + 4, port);
}

/*
 * DSDT body, AML for:
 *   Scope (\_SB) {
 *     Device (COM1) {
 *       Name (_HID, EisaId ("PNP0501"))
 *       Name (_UID, 0)
 *       Name (_CRS, ResourceTemplate () {
 *         IO (Decode16, 0x3f8, 0x3f8, 8, 8)
 *         IRQNoFlags () { 4 }      (edge, active high)
 *       })
 *     }
 *   }
 * Every package here is shorter than 64 bytes, so each PkgLength is one byte
 * (it counts itself and what follows it).
 */
static const uint8_t dsdt_aml[] = {
    0x10, 51, '\\', '_', 'S', 'B', '_',                  /* Scope, PkgLength, \_SB_ */
    0x5b, 0x82, 43, 'C', 'O', 'M', '1',                  /* Device, PkgLength, COM1 */
    0x08, '_', 'H', 'I', 'D', 0x0c, 0x41, 0xd0, 0x05, 0x01, /* Name _HID, DWord EisaId PNP0501 */
    0x08, '_', 'U', 'I', 'D', 0x00,                      /* Name _UID, Zero */
    0x08, '_', 'C', 'R', 'S', 0x11, 16, 0x0a, 13,        /* Name _CRS, Buffer, PkgLength, size 13 */
    0x47, 0x01, 0xf8, 0x03, 0xf8, 0x03, 0x08, 0x08,      /* I/O port: decode16, 0x3f8-0x3f8, align 8, 8 ports */
    0x22, 0x10, 0x00,                                    /* IRQ mask: IRQ 4 */
    0x79, 0x00,                                          /* end tag */
};
_Static_assert(sizeof dsdt_aml == 52, "AML package lengths above assume 52 bytes");
_Static_assert(DSDT_OFF + HEADER_LEN + sizeof dsdt_aml <= MADT_OFF, "the DSDT runs into the MADT");

static void write_fadt(uint8_t *t, uint64_t dsdt_gpa) {
    header(t, "FACP", FADT_LEN, 6);
    put_u32(t, 40, (uint32_t)dsdt_gpa);
    put_u16(t, 109, IAPC_VGA_NOT_PRESENT);
    put_u32(t, 112, FADT_HW_REDUCED | FADT_RESET_REG_SUP);
    io_byte_gas(t, 116, RESET_PORT);
    put_u8(t, 128, RESET_VALUE);
    put_u8(t, 131, 1); /* FADT minor version: 6.1 */
    put_u64(t, 140, dsdt_gpa);
    seal(t);
}

static uint32_t write_madt(uint8_t *t) {
    uint32_t len = 44;
    put_u32(t, 36, LAPIC_GPA);
    put_u32(t, 40, MADT_PCAT_COMPAT);
    /* Processor local APIC: UID 0, APIC id 0, enabled. */
    uint8_t lapic[8] = {0, 8, 0, 0, 1, 0, 0, 0};
    memcpy(t + len, lapic, sizeof lapic);
    len += sizeof lapic;
    /* KVM's in-kernel IOAPIC: id 0, GSIs 0-23. No overrides: a hardware-reduced guest keeps no ISA IRQs,
     * devices name GSIs (the UART's is in the DSDT), and KVM routes GSI n to pin n. */
    uint8_t ioapic[12] = {1, 12, 0, 0};
    put_u32(ioapic, 4, IOAPIC_GPA);
    memcpy(t + len, ioapic, sizeof ioapic);
    len += sizeof ioapic;
    header(t, "APIC", len, 4);
    seal(t);
    return len;
}

static void write_rsdp(uint8_t *r, uint64_t xsdt_gpa) {
    memcpy(r, "RSD PTR ", 8);
    memcpy(r + 9, "CLADE ", 6);
    put_u8(r, 15, 2); /* ACPI 2.0+: XSDT */
    put_u32(r, 20, 36);
    put_u64(r, 24, xsdt_gpa);
    r[8] = checksum(r, 20);
    r[32] = checksum(r, 36);
}

uint64_t acpi_tables_install(struct vm *vm) {
    uint8_t *base = vm_guest_ptr(vm, TABLES_GPA, TABLES_SIZE);
    if (!base) return 0;
    memset(base, 0, TABLES_SIZE);
    uint8_t *xsdt = base + XSDT_OFF, *dsdt = base + DSDT_OFF;
    header(dsdt, "DSDT", HEADER_LEN + sizeof dsdt_aml, 2);
    memcpy(dsdt + HEADER_LEN, dsdt_aml, sizeof dsdt_aml);
    seal(dsdt);
    write_fadt(base + FADT_OFF, TABLES_GPA + DSDT_OFF);
    write_madt(base + MADT_OFF);
    header(xsdt, "XSDT", HEADER_LEN + 16, 1);
    put_u64(xsdt, HEADER_LEN, TABLES_GPA + FADT_OFF);
    put_u64(xsdt, HEADER_LEN + 8, TABLES_GPA + MADT_OFF);
    seal(xsdt);
    write_rsdp(base + RSDP_OFF, TABLES_GPA + XSDT_OFF);
    return TABLES_GPA + RSDP_OFF;
}
