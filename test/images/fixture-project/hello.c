#include <stdio.h>

int main(void)
{
	printf("hello from %s\n", "a compiled C file");
	return 0;
}
