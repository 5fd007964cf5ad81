/*
 * kprintf: printf's integer, string and character conversions, written
 * straight to the UART.  Nothing is buffered, so output made just before a
 * crash or an exit is never lost.
 */
#include <stdarg.h>

#include "kernel.h"

static void put_padding(char c, int count)
{
    while (count-- > 0)
        uart_putc(c);
}

static void put_number(uint64_t value, unsigned base, int negative, int hex_prefix,
                       int width, int zero_pad)
{
    char digits[20];    /* 2^64 - 1 has 20 decimal digits */
    int n = 0;
    do {
        digits[n++] = "0123456789abcdef"[value % base];
        value /= base;
    } while (value);

    const char *prefix = negative ? "-" : hex_prefix ? "0x" : "";
    int prefix_len = negative ? 1 : hex_prefix ? 2 : 0;
    int padding = width - prefix_len - n;

    /* As in printf, zeros go between the sign or 0x and the digits,
     * spaces before both. */
    if (!zero_pad)
        put_padding(' ', padding);
    uart_write(prefix, prefix_len);
    if (zero_pad)
        put_padding('0', padding);
    while (n)
        uart_putc(digits[--n]);
}

void kprintf(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    while (*fmt) {
        char c = *fmt++;
        if (c != '%') {
            uart_putc(c);
            continue;
        }
        int hex_prefix = 0, zero_pad = 0, width = 0, is_long = 0;
        for (;; fmt++) {
            if (*fmt == '#')
                hex_prefix = 1;
            else if (*fmt == '0')
                zero_pad = 1;
            else
                break;
        }
        while (*fmt >= '0' && *fmt <= '9')
            width = width * 10 + (*fmt++ - '0');
        if (*fmt == 'l') {
            is_long = 1;
            fmt++;
        }
        switch (*fmt) {
        case 'd': {
            int64_t v = is_long ? va_arg(ap, long) : va_arg(ap, int);
            put_number(v < 0 ? -(uint64_t)v : (uint64_t)v, 10, v < 0, 0, width, zero_pad);
            break;
        }
        case 'u':
            put_number(is_long ? va_arg(ap, unsigned long) : va_arg(ap, unsigned), 10, 0, 0,
                       width, zero_pad);
            break;
        case 'x':
            put_number(is_long ? va_arg(ap, unsigned long) : va_arg(ap, unsigned), 16, 0,
                       hex_prefix, width, zero_pad);
            break;
        case 'p':
            put_number((uintptr_t)va_arg(ap, void *), 16, 0, 1, width, zero_pad);
            break;
        case 's': {
            const char *s = va_arg(ap, const char *);
            size_t len = 0;
            while (s[len])
                len++;
            put_padding(' ', width - (int)len);
            uart_write(s, len);
            break;
        }
        case 'c':
            uart_putc((char)va_arg(ap, int));
            break;
        case '%':
            uart_putc('%');
            break;
        case '\0':
            /* A lone % at the end: print it rather than read past the NUL. */
            uart_putc('%');
            va_end(ap);
            return;
        default:
            /* Unknown conversions are printed as written, to be noticed. */
            uart_putc('%');
            uart_putc(*fmt);
            break;
        }
        fmt++;
    }
    va_end(ap);
}
