// Runs one SQL statement on DATABASE_URL and prints the first column of each row (run.sh's
// helper, so that it needs no psql).
import pg from "pg";

const client = new pg.Client({ connectionString: process.env.DATABASE_URL });
try {
  await client.connect();
  const { rows, fields } = await client.query(process.argv[2]);
  for (const row of rows) console.log(String(row[fields[0].name]));
  await client.end();
} catch (e) {
  console.error(`query.mjs: ${e.message}`);
  process.exit(1);
}
