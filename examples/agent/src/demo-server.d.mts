export const DEMO_ROUTES: Record<string, unknown>;
export interface DemoServer {
  url: string;
  routes: string[];
  /** Every request the server got, in order. */
  requests: Array<{ method: string | undefined; path: string }>;
  close(): Promise<void>;
}
export function startDemoServer(opts?: { port?: number; routes?: Record<string, unknown> }): Promise<DemoServer>;
