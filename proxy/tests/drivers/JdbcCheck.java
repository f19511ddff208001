// pgjdbc through lagrouter-proxy: server-prepared statements
// (prepareThreshold=1), read-your-writes, batches in a transaction,
// setReadOnly in autocommit and in a transaction. Each check asserts the
// results and where statements ran (pg_is_in_recovery()).
//
// Run by the proxy's e2e test `drivers::pgjdbc` with the source launcher
// (`java -cp postgresql.jar JdbcCheck.java`) and LAGROUTER_JDBC_URL set.
// Exits non-zero on the first failed check.

import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.PreparedStatement;
import java.sql.ResultSet;
import java.sql.Statement;

public class JdbcCheck {
    static void check(boolean cond, String what) {
        if (!cond) {
            System.err.println("pgjdbc check failed: " + what);
            System.exit(1);
        }
    }

    public static void main(String[] args) throws Exception {
        String url = System.getenv("LAGROUTER_JDBC_URL");
        try (Connection c = DriverManager.getConnection(url)) {
            Statement s = c.createStatement();
            s.execute("DROP TABLE IF EXISTS jdbc_t");
            s.execute("CREATE TABLE jdbc_t(id int PRIMARY KEY, v text)");
            PreparedStatement ins = c.prepareStatement("INSERT INTO jdbc_t VALUES (?, ?)");
            PreparedStatement sel =
                c.prepareStatement("SELECT v, pg_is_in_recovery() FROM jdbc_t WHERE id = ?");
            int onReplica = 0;
            for (int i = 0; i < 20; i++) {
                ins.setInt(1, i);
                ins.setString(2, "v" + i);
                check(ins.executeUpdate() == 1, "insert");
                sel.setInt(1, i);
                try (ResultSet rs = sel.executeQuery()) {
                    check(rs.next() && rs.getString(1).equals("v" + i), "read-your-writes");
                    if (rs.getBoolean(2)) onReplica++;
                }
            }
            check(onReplica >= 18, "writer's read-backs on replicas: " + onReplica + "/20");

            c.setAutoCommit(false);
            for (int i = 100; i < 150; i++) {
                ins.setInt(1, i);
                ins.setString(2, "batch");
                ins.addBatch();
            }
            int[] counts = ins.executeBatch();
            check(counts.length == 50, "batch");
            c.commit();
            c.setAutoCommit(true);
            try (ResultSet rs = s.executeQuery("SELECT count(*) FROM jdbc_t")) {
                check(rs.next() && rs.getInt(1) == 70, "rows after the batch");
            }

            // Read-only in autocommit changes nothing on the server, as directly.
            c.setReadOnly(true);
            try (ResultSet rs = s.executeQuery("SHOW transaction_read_only")) {
                check(rs.next() && rs.getString(1).equals("off"), "transaction_read_only in autocommit");
            }
            // Read-only transactions (BEGIN READ ONLY) run on a replica.
            c.setAutoCommit(false);
            for (int i = 0; i < 3; i++) {
                try (ResultSet rs = s.executeQuery("SELECT count(*), pg_is_in_recovery() FROM jdbc_t")) {
                    check(rs.next() && rs.getInt(1) == 70, "read-only transaction result");
                    check(rs.getBoolean(2), "read-only transaction on a replica");
                }
                c.commit();
            }
            c.setAutoCommit(true);
            c.setReadOnly(false);
            System.out.println("pgjdbc: ok (" + onReplica + "/20 of a writer's read-backs on replicas)");
        }
    }
}
