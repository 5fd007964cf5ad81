/*
 * Kernel command-line parameters: words separated by spaces, each either
 * "name=value" or anything else (ignored).  The last word with a name wins,
 * as on Linux.  The VMM puts the NUL-terminated line at boot->cmdline,
 * inside the identity-mapped low 4 GiB.
 */
#include "kernel.h"

static int is_space(char c)
{
    return c == ' ' || c == '\t' || c == '\n';
}

/* The value of the last "name=..." word, or NULL; *len is its length. */
static const char *find_param(const char *line, const char *name, size_t *len)
{
    size_t name_len = 0;
    while (name[name_len])
        name_len++;
    const char *found = NULL;
    while (*line) {
        while (is_space(*line))
            line++;
        const char *word = line;
        while (*line && !is_space(*line))
            line++;
        size_t word_len = (size_t)(line - word);
        if (word_len > name_len && memcmp(word, name, name_len) == 0 && word[name_len] == '=') {
            found = word + name_len + 1;
            *len = word_len - name_len - 1;
        }
    }
    return found;
}

unsigned cmdline_uint(const struct rrstub_boot_info *boot, const char *name,
                      unsigned fallback, unsigned max)
{
    size_t len = 0;
    const char *value = find_param((const char *)(uintptr_t)boot->cmdline, name, &len);
    if (!value)
        return fallback;
    uint64_t n = 0;
    size_t i = 0;
    for (; i < len && value[i] >= '0' && value[i] <= '9' && n <= max; i++)
        n = n * 10 + (uint64_t)(value[i] - '0');
    if (i == 0 || i < len || n > max) {
        kprintf("cmdline: %s= takes a whole number from 0 to %u; using %u\n", name, max, fallback);
        return fallback;
    }
    return (unsigned)n;
}
