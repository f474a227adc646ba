/*
 * A 16550A-compatible UART at an I/O base (0x3f8 for ttyS0): enough for
 * Linux's 8250 driver to detect it and for earlyprintk / console=ttyS0.
 * Transmitted bytes go straight to an output descriptor (dropped if it would
 * block: the guest's console must never stall the VMM); received bytes are
 * queued with uart_receive() in a 64-byte FIFO. The interrupt line (IRQ 4 on
 * a PC) is driven through an optional level callback.
 *
 * fork(2): state is plain memory; in the child call uart_set_output_fd() if
 * the output should go elsewhere, and uart_resync_irq() once the new VM's
 * irqchip exists, to drive the line to its current level again.
 */
#ifndef CLADE_UART8250_H
#define CLADE_UART8250_H

#include <stdbool.h>
#include <stdint.h>

#define UART_COM1_BASE 0x3f8
#define UART_COM1_IRQ 4
#define UART_FIFO_SIZE 64

typedef void (*uart_irq_fn)(void *ctx, bool level);
/* Where transmitted bytes go instead of out_fd, when set (e.g. a size-capped log). */
typedef void (*uart_tx_fn)(void *ctx, uint8_t byte);

struct uart8250 {
    uint16_t base;
    int out_fd;
    uart_tx_fn tx;
    void *tx_ctx;
    uart_irq_fn irq;
    void *irq_ctx;
    uint8_t ier, lcr, mcr, scr, dll, dlm, fcr;
    bool thre_pending; /* "transmitter empty" interrupt not yet acknowledged */
    bool irq_level;
    uint8_t rx[UART_FIFO_SIZE];
    unsigned rx_head, rx_count;
};

void uart_init(struct uart8250 *u, uint16_t base, int out_fd, uart_irq_fn irq, void *irq_ctx);
void uart_set_output_fd(struct uart8250 *u, int out_fd);
void uart_set_output(struct uart8250 *u, uart_tx_fn tx, void *ctx);

/* Saved state: the registers and the receive FIFO, plain data. Restored into
 * a UART set up with the same base; false (u unchanged) if a value is one the
 * registers cannot hold. The line is not driven: call uart_resync_irq. */
struct uart_state {
    uint8_t ier, lcr, mcr, scr, dll, dlm, fcr, thre_pending, irq_level, rx_head, rx_count;
    uint8_t reserved[5]; /* 0 */
    uint8_t rx[UART_FIFO_SIZE];
};

void uart_save(const struct uart8250 *u, struct uart_state *s);
bool uart_restore(struct uart8250 *u, const struct uart_state *s);

/* KVM_EXIT_IO: false if port is not one of the UART's eight. */
bool uart_io(struct uart8250 *u, uint16_t port, bool is_write, uint8_t *data, unsigned size);

/* Queues host input for the guest; returns how many bytes fit. */
unsigned uart_receive(struct uart8250 *u, const uint8_t *buf, unsigned len);

void uart_resync_irq(struct uart8250 *u);

#endif
