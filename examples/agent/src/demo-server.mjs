// The local HTTP service the demo's http_get tool talks to: a few fixed JSON routes on 127.0.0.1.
import http from 'node:http';

export const DEMO_ROUTES = {
  '/inventory': { items: [{ name: 'bolt', price: 0.25, count: 120 }, { name: 'nut', price: 0.1, count: 200 }] },
  '/status': { ok: true, service: 'demo inventory' },
};

/** Starts the service on a free port of 127.0.0.1 (or `port`); `requests` lists the paths asked for. */
export function startDemoServer({ port = 0, routes = DEMO_ROUTES } = {}) {
  const requests = [];
  const server = http.createServer((req, res) => {
    const { pathname } = new URL(req.url ?? '/', 'http://127.0.0.1');
    requests.push({ method: req.method, path: pathname });
    const body = req.method === 'GET' ? routes[pathname] : undefined;
    res.writeHead(body ? 200 : req.method === 'GET' ? 404 : 405, { 'content-type': 'application/json' });
    res.end(JSON.stringify(body ?? { error: req.method === 'GET' ? `no route ${pathname}; routes: ${Object.keys(routes).join(', ')}` : 'only GET' }));
  });
  return new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(port, '127.0.0.1', () => {
      const { port: bound } = server.address();
      resolve({
        url: `http://127.0.0.1:${bound}`,
        routes: Object.keys(routes),
        requests,
        close: () => new Promise((done) => server.close(() => done())),
      });
    });
  });
}
