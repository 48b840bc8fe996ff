/* A guest whose __jump_table has, besides its real site, an entry naming a data word:
 * the emulator must refuse to patch it (one line, exit 2) rather than write data. */
#define KEMU_CREATE_TRACE_POINTS
#include "kemu_tracepoint.h"

TRACE_EVENT(ok, TP_PROTO(int a), TP_ARGS(a), TP_printk("a=%d", a));

__attribute__((used)) long data_word;

asm(".pushsection __jump_table, \"aw\"\n\t"
    ".balign 8\n\t"
    ".long data_word - ., data_word - .\n\t"
    ".quad __tracepoint_ok + 8 - .\n\t"
    ".popsection");

int main(int argc, char **argv)
{
	trace_ok(argc);
	return 0;
}
