#include "uart8250.h"

#include <errno.h>
#include <string.h>
#include <unistd.h>

/* Register offsets. */
enum { RBR_THR = 0, IER = 1, IIR_FCR = 2, LCR = 3, MCR = 4, LSR = 5, MSR = 6, SCR = 7 };

#define LCR_DLAB 0x80
#define IER_RDI 0x01  /* data available */
#define IER_THRI 0x02 /* transmitter empty */
#define IIR_NONE 0x01
#define IIR_THRI 0x02
#define IIR_RDI 0x04
#define IIR_FIFO_ON 0xC0
#define FCR_ENABLE 0x01
#define FCR_CLEAR_RX 0x02
#define LSR_DR 0x01
#define LSR_THRE 0x20
#define LSR_TEMT 0x40
#define MCR_LOOP 0x10
#define MSR_CTS 0x10
#define MSR_DSR 0x20
#define MSR_RI 0x40
#define MSR_DCD 0x80
#define IER_MASK 0x0f
#define MCR_MASK 0x1f
#define FCR_MASK 0xC9 /* enable, DMA mode, trigger level */

void uart_init(struct uart8250 *u, uint16_t base, int out_fd, uart_irq_fn irq, void *irq_ctx)
{
    memset(u, 0, sizeof *u);
    u->base = base;
    u->out_fd = out_fd;
    u->irq = irq;
    u->irq_ctx = irq_ctx;
    u->dll = 12; /* 9600 baud, as after a PC's reset */
    u->mcr = 0x08;
}

void uart_set_output_fd(struct uart8250 *u, int out_fd) { u->out_fd = out_fd; }

void uart_set_output(struct uart8250 *u, uart_tx_fn tx, void *ctx)
{
    u->tx = tx;
    u->tx_ctx = ctx;
}

static uint8_t pending_source(const struct uart8250 *u)
{
    if ((u->ier & IER_RDI) && u->rx_count)
        return IIR_RDI;
    if ((u->ier & IER_THRI) && u->thre_pending)
        return IIR_THRI;
    return IIR_NONE;
}

static void update_irq(struct uart8250 *u, bool force)
{
    /* OUT2 gates the interrupt line on PC serial ports. */
    bool level = pending_source(u) != IIR_NONE && (u->mcr & 0x08);
    if ((level != u->irq_level || force) && u->irq)
        u->irq(u->irq_ctx, level);
    u->irq_level = level;
}

void uart_resync_irq(struct uart8250 *u) { update_irq(u, true); }

static void transmit(struct uart8250 *u, uint8_t byte)
{
    if (u->mcr & MCR_LOOP) {
        uart_receive(u, &byte, 1);
    } else if (u->tx) {
        u->tx(u->tx_ctx, byte);
    } else if (u->out_fd >= 0) {
        ssize_t n;
        do
            n = write(u->out_fd, &byte, 1);
        while (n < 0 && errno == EINTR);
        /* A full or closed output loses the byte, like a cable nobody reads. */
    }
    u->thre_pending = true; /* sent at once: the holding register is empty again */
}

static uint8_t receive_byte(struct uart8250 *u)
{
    if (!u->rx_count)
        return 0;
    uint8_t b = u->rx[u->rx_head];
    u->rx_head = (u->rx_head + 1) % UART_FIFO_SIZE;
    u->rx_count--;
    return b;
}

unsigned uart_receive(struct uart8250 *u, const uint8_t *buf, unsigned len)
{
    unsigned n = 0;
    for (; n < len && u->rx_count < UART_FIFO_SIZE; n++)
        u->rx[(u->rx_head + u->rx_count++) % UART_FIFO_SIZE] = buf[n];
    update_irq(u, false);
    return n;
}

static uint8_t modem_status(const struct uart8250 *u)
{
    if (!(u->mcr & MCR_LOOP))
        return MSR_DCD | MSR_DSR | MSR_CTS; /* a cable with someone on it */
    /* Loopback wires DTR->DSR, RTS->CTS, OUT1->RI, OUT2->DCD; Linux's
     * probe checks exactly this. */
    return (uint8_t)(((u->mcr & 0x01) ? MSR_DSR : 0) | ((u->mcr & 0x02) ? MSR_CTS : 0) |
                     ((u->mcr & 0x04) ? MSR_RI : 0) | ((u->mcr & 0x08) ? MSR_DCD : 0));
}

static uint8_t read_reg(struct uart8250 *u, unsigned reg)
{
    bool dlab = u->lcr & LCR_DLAB;
    switch (reg) {
    case RBR_THR:
        return dlab ? u->dll : receive_byte(u);
    case IER:
        return dlab ? u->dlm : u->ier;
    case IIR_FCR: {
        uint8_t src = pending_source(u);
        if (src == IIR_THRI)
            u->thre_pending = false; /* reading IIR acknowledges THRE */
        return (uint8_t)(src | ((u->fcr & FCR_ENABLE) ? IIR_FIFO_ON : 0));
    }
    case LCR:
        return u->lcr;
    case MCR:
        return u->mcr;
    case LSR:
        return (uint8_t)(LSR_THRE | LSR_TEMT | (u->rx_count ? LSR_DR : 0));
    case MSR:
        return modem_status(u);
    default:
        return u->scr;
    }
}

static void write_reg(struct uart8250 *u, unsigned reg, uint8_t v)
{
    bool dlab = u->lcr & LCR_DLAB;
    switch (reg) {
    case RBR_THR:
        if (dlab)
            u->dll = v;
        else
            transmit(u, v);
        break;
    case IER:
        if (dlab) {
            u->dlm = v;
        } else {
            /* Enabling THRI while the transmitter is empty raises it at once. */
            if ((v & IER_THRI) && !(u->ier & IER_THRI))
                u->thre_pending = true;
            u->ier = v & IER_MASK;
        }
        break;
    case IIR_FCR:
        u->fcr = v & FCR_MASK;
        if (v & FCR_CLEAR_RX)
            u->rx_count = 0;
        break;
    case LCR:
        u->lcr = v;
        break;
    case MCR:
        u->mcr = v & MCR_MASK;
        break;
    case SCR:
        u->scr = v;
        break;
    default:
        break; /* LSR and MSR are read-only */
    }
}

bool uart_io(struct uart8250 *u, uint16_t port, bool is_write, uint8_t *data, unsigned size)
{
    if (port < u->base || port >= u->base + 8)
        return false;
    /* The registers are bytes; a wider access touches consecutive ones. */
    for (unsigned i = 0; i < size; i++) {
        unsigned reg = port - u->base + i;
        if (reg >= 8) {
            if (!is_write)
                data[i] = 0xff;
            continue;
        }
        if (is_write)
            write_reg(u, reg, data[i]);
        else
            data[i] = read_reg(u, reg);
    }
    update_irq(u, false);
    return true;
}

_Static_assert(sizeof(struct uart_state) == 16 + UART_FIFO_SIZE, "no implicit padding in saved state");

void uart_save(const struct uart8250 *u, struct uart_state *s)
{
    memset(s, 0, sizeof *s);
    s->ier = u->ier, s->lcr = u->lcr, s->mcr = u->mcr, s->scr = u->scr, s->dll = u->dll, s->dlm = u->dlm, s->fcr = u->fcr;
    s->thre_pending = u->thre_pending, s->irq_level = u->irq_level;
    s->rx_head = (uint8_t)u->rx_head, s->rx_count = (uint8_t)u->rx_count;
    memcpy(s->rx, u->rx, sizeof s->rx);
}

bool uart_restore(struct uart8250 *u, const struct uart_state *s)
{
    for (unsigned i = 0; i < sizeof s->reserved; i++)
        if (s->reserved[i])
            return false;
    if ((s->ier & ~IER_MASK) || (s->mcr & ~MCR_MASK) || (s->fcr & ~FCR_MASK) || s->thre_pending > 1 || s->irq_level > 1 ||
        s->rx_head >= UART_FIFO_SIZE || s->rx_count > UART_FIFO_SIZE)
        return false;
    u->ier = s->ier, u->lcr = s->lcr, u->mcr = s->mcr, u->scr = s->scr, u->dll = s->dll, u->dlm = s->dlm, u->fcr = s->fcr;
    u->thre_pending = s->thre_pending, u->irq_level = s->irq_level;
    u->rx_head = s->rx_head, u->rx_count = s->rx_count;
    memcpy(u->rx, s->rx, sizeof u->rx);
    return true;
}
