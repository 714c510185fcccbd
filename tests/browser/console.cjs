// Drives the web console in headless Chromium (playwright-core over the
// DevTools protocol), as a person would.
//
//   node console.cjs approve    <base-url> <token-file> <run-id> <node>
//   node console.cjs screenshot <base-url> <token-file> <run-id> <png>
//
// Environment: PLAYWRIGHT_CORE (the playwright-core module directory),
// CHROMIUM (default /usr/bin/chromium). Prints one line per step; exits 1
// on any failure with the reason.
const pw = require(process.env.PLAYWRIGHT_CORE || 'playwright-core');
const fs = require('fs');

async function main() {
  const [mode, base, tokenFile, run, arg] = process.argv.slice(2);
  const token = fs.readFileSync(tokenFile, 'utf8').trim();
  const browser = await pw.chromium.launch({
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    headless: true,
    args: ['--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage'],
  });
  try {
    const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
    page.setDefaultTimeout(20000);
    await page.goto(`${base}/login`);
    await page.fill('input[name=token]', token);
    await Promise.all([page.waitForNavigation(), page.click('button[type=submit]')]);
    console.log(`signed in: ${await page.textContent('header')}`);
    if (mode === 'approve') {
      const form = page.locator(`form[action="/approvals/${run}/${arg}"]`);
      await form.waitFor();
      await form.locator('input[name=comment]').fill('looks good (browser test)');
      await Promise.all([page.waitForNavigation(), form.locator('button[value=approve]').click()]);
      const ok = await page.locator('div.ok').textContent();
      console.log(`decided: ${ok}`);
      if (!ok.includes('approved')) throw new Error(`no confirmation: ${ok}`);
    } else if (mode === 'screenshot') {
      await page.goto(`${base}/runs/${run}`);
      await page.locator('svg[aria-label="pipeline graph"]').waitFor();
      await page.screenshot({ path: arg, fullPage: false });
      console.log(`screenshot: ${arg}`);
    } else {
      throw new Error(`unknown mode ${mode}`);
    }
  } finally {
    await browser.close();
  }
}

main().catch((e) => {
  console.error(`browser: ${e && e.stack ? e.stack : e}`);
  process.exit(1);
});
