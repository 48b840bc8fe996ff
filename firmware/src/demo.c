/*
 * demo.c - every program in one image (used by `make demo`):
 *   1. the syscall path of callpath.c (one round of requests)
 *   2. the packet parser of flowdissect.c
 *   3. the recursive functions of recurse.c
 *   4. a short hot loop (hotloop.c: hot_loop(10000), hot_call(1000))
 *   5. the special-instruction functions (insns.c + arch/<arch>/insns.S)
 * Built as a unity build: the program sources are included with IN_DEMO
 * defined so their own main() is left out; all functions keep their names.
 * The NOKPROBE_SYMBOL entries (syscall_entry, do_trap), the .kprobes.text
 * function (handle_bad_syscall) and the .noinstr.text function
 * (enter_from_user_mode) come from callpath.c.
 */
#define IN_DEMO 1
#include "platform.h"
#include "callpath.c"
#include "flowdissect.c"
#include "recurse.c"
#include "hotloop.c"
#include "insns.c"

static void section(const char *title)
{
	putstr("== ");
	putstr(title);
	putstr(" ==");
	putnl();
}

int main(int argc, char **argv)
{
	(void)argc;
	(void)argv;
	section("callpath");
	callpath_main(1);
	section("flowdissect");
	flowdissect_main();
	section("recurse");
	recurse_main();
	section("hotloop");
	hotloop_run(10000, 1000);
	section("insns");
	insns_main();
	section("done");
	return 0;
}
