/* The product build: no requests beyond the protocol's own (control_test.c has the test build's). */
#include "vmm.h"

const struct control_command control_test_commands[] = {{NULL, NULL}};
