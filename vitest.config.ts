import { defineConfig } from 'vitest/config';

export default defineConfig({
  test: {
    reporters: ['default'],
    // Real VMs under emulation on a 2-core machine: one file at a time so boots do not starve
    // each other (`npm run test:unit` turns parallelism back on for the VM-free files alone).
    fileParallelism: false,
    projects: [
      {
        // VM-free: pure logic, defensive parsing, the core on a fake engine. Seconds.
        test: { name: 'unit', include: ['test/**/*.unit.test.ts'], testTimeout: 60_000 },
      },
      {
        // Real VMs, and time for slow boots.
        test: { name: 'vm', include: ['test/**/*.test.ts'], exclude: ['test/**/*.unit.test.ts'], testTimeout: 180_000, hookTimeout: 240_000 },
      },
    ],
  },
});
